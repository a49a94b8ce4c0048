// loramix._core.divergence: buffer checks, then the whole batch with the GIL released.
// The Python wrapper (loramix/divergence.py) converts scipy.sparse / CSR / dense inputs into the
// two forms accepted here; this layer refuses anything else rather than copying it silently.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "common.h"
#include "loramix/divergence.h"

namespace loramix::bind {
namespace py = pybind11;

namespace {

// Keeps the arrays behind a HistMatrix alive for the duration of the call.
struct HeldMatrix {
  HistMatrix m;
  py::object keep[3];
};

HeldMatrix to_matrix(const py::handle& obj, const char* name) {
  HeldMatrix h;
  if (py::isinstance<py::tuple>(obj)) {
    auto t = py::reinterpret_borrow<py::tuple>(obj);
    if (t.size() != 4)
      throw py::value_error(std::string(name) + ": CSR must be (indptr, indices, data, n_cols)");
    const std::string ip = std::string(name) + ".indptr", ix = std::string(name) + ".indices",
                      dt = std::string(name) + ".data";
    auto indptr = require_array<int64_t>(t[0], ip.c_str());
    auto indices = require_array<int32_t>(t[1], ix.c_str());
    auto data_any = py::reinterpret_borrow<py::object>(t[2]);
    if (!py::isinstance<py::array>(data_any))
      throw py::type_error(dt + ": expected a numpy array");
    auto data_arr = py::reinterpret_borrow<py::array>(data_any);
    const long long n_cols = t[3].cast<long long>();
    if (indptr.ndim() != 1 || indptr.size() < 1)
      throw py::value_error(ip + ": must be 1-D with rows + 1 entries");
    if (indices.ndim() != 1 || data_arr.ndim() != 1 || indices.size() != data_arr.size())
      throw py::value_error(std::string(name) + ": indices and data must be 1-D of equal length");
    const int64_t last = indptr.data()[indptr.size() - 1];
    if (last < 0 || last > static_cast<int64_t>(indices.size()))
      throw py::value_error(ip + ": last entry must be <= len(indices)");
    if (n_cols < 1) throw py::value_error(std::string(name) + ": n_cols must be >= 1");
    h.m.sparse = true;
    h.m.rows = static_cast<int64_t>(indptr.size()) - 1;
    h.m.cols = n_cols;
    h.m.indptr = indptr.data();
    h.m.indices = indices.data();
    if (data_arr.dtype().is(py::dtype::of<float>())) {
      auto d = require_array<float>(data_arr, dt.c_str());
      h.m.dtype = DType::F32;
      h.m.data = d.data();
      h.keep[2] = d;
    } else {
      auto d = require_array<double>(data_arr, dt.c_str());
      h.m.dtype = DType::F64;
      h.m.data = d.data();
      h.keep[2] = d;
    }
    h.keep[0] = indptr;
    h.keep[1] = indices;
    return h;
  }
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a 2-D numpy array or a CSR tuple");
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.ndim() != 2) throw py::value_error(std::string(name) + ": expected a 2-D array (rows x bins)");
  if (arr.dtype().is(py::dtype::of<float>())) {
    auto a = require_array<float>(arr, name);
    h.m.dtype = DType::F32;
    h.m.data = a.data();
    h.keep[0] = a;
  } else {
    auto a = require_array<double>(arr, name);
    h.m.dtype = DType::F64;
    h.m.data = a.data();
    h.keep[0] = a;
  }
  h.m.sparse = false;
  h.m.rows = arr.shape(0);
  h.m.cols = arr.shape(1);
  h.m.row_stride = arr.shape(1);
  return h;
}

Metric parse_metric(const std::string& s) {
  if (s == "js") return Metric::js;
  if (s == "kl") return Metric::kl;
  if (s == "wd") return Metric::wd;
  throw py::value_error("divergence: unknown metric '" + s + "' (expected 'js', 'kl' or 'wd')");
}

}  // namespace

void register_divergence(py::module_& m) {
  m.def(
      "divergence",
      [](py::object P, py::object R, const std::string& metric, double eps, int threads) {
        const Metric met = parse_metric(metric);
        HeldMatrix hp = to_matrix(P, "P");
        HeldMatrix hr;
        const bool has_r = !R.is_none();
        if (has_r) hr = to_matrix(R, "R");
        if (has_r && hr.m.cols != hp.m.cols)
          throw py::value_error("divergence: P has " + std::to_string(hp.m.cols) + " columns but R has " +
                                std::to_string(hr.m.cols));
        const int64_t Q = hp.m.rows, N = has_r ? hr.m.rows : hp.m.rows;
        py::array_t<double> out({static_cast<py::ssize_t>(Q), static_cast<py::ssize_t>(N)});
        double* o = out.mutable_data();
        const HistMatrix pm = hp.m, rm = hr.m;
        run_interruptible([&](Cancel& cancel) {
          divergence(pm, has_r ? &rm : nullptr, met, eps, threads, &cancel, o);
          return 0;
        });
        return out;
      },
      py::arg("P"), py::arg("R"), py::arg("metric"), py::arg("eps"), py::arg("threads"),
      "Low-level divergence kernel; use loramix.divergence.divergence. P/R: C-contiguous 2-D "
      "float32/float64 array or (indptr int64, indices int32, data float32/float64, n_cols). "
      "threads <= 0: default.");
  // A prepared bank keeps its own copy of R (the caller's arrays may change or go away).
  py::class_<PreparedHistograms>(m, "PreparedHistograms")
      .def(py::init([](py::object R, double eps, int threads) {
             HeldMatrix hr = to_matrix(R, "R");
             const HistMatrix rm = hr.m;
             return run_interruptible([&](Cancel& cancel) {
               return std::make_unique<PreparedHistograms>(rm, eps, threads, &cancel);
             });
           }),
           py::arg("R"), py::arg("eps"), py::arg("threads"),
           "R: C-contiguous 2-D float32/float64 array or (indptr int64, indices int32, data "
           "float32/float64, n_cols); copied. threads <= 0: default.")
      .def_property_readonly("rows", &PreparedHistograms::rows)
      .def_property_readonly("cols", &PreparedHistograms::cols)
      .def_property_readonly("eps", &PreparedHistograms::eps)
      .def(
          "divergence",
          [](const PreparedHistograms& self, py::object P, const std::string& metric, int threads) {
            const Metric met = parse_metric(metric);
            HeldMatrix hp = to_matrix(P, "P");
            if (hp.m.cols != self.cols())
              throw py::value_error("divergence: P has " + std::to_string(hp.m.cols) +
                                    " columns but R has " + std::to_string(self.cols()));
            py::array_t<double> out({static_cast<py::ssize_t>(hp.m.rows), static_cast<py::ssize_t>(self.rows())});
            double* o = out.mutable_data();
            const HistMatrix pm = hp.m;
            run_interruptible([&](Cancel& cancel) {
              self.divergence(pm, met, threads, &cancel, o);
              return 0;
            });
            return out;
          },
          py::arg("P"), py::arg("metric"), py::arg("threads"),
          "P against the prepared bank; same result as divergence(P, R, metric, eps, threads).");
}

}  // namespace loramix::bind
