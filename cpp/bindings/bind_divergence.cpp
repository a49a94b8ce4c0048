// loramix._core.divergence: buffer checks, then the whole batch with the GIL released.
// The Python wrapper (loramix/divergence.py) converts scipy.sparse / CSR / dense inputs into the
// two forms accepted here; this layer refuses anything else rather than copying it silently.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <string>
#include <type_traits>

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
          "P against the prepared bank; same result as divergence(P, R, metric, eps, threads).")
      .def(
          "export_js_index",
          [](const PreparedHistograms& self, long long tiles, int threads) {
            JsIndex x = run_interruptible([&](Cancel& cancel) { return self.export_js_index(tiles, threads, &cancel); });
            auto arr = [](const auto& v) {
              using T = typename std::decay_t<decltype(v)>::value_type;
              py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
              if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
              return a;
            };
            py::dict d;
            d["tile_rows"] = arr(x.tile_rows);
            d["tile_offset"] = arr(x.tile_offset);
            d["voff"] = arr(x.voff).attr("reshape")(x.tiles, x.cols + 1);
            d["row"] = arr(x.row);
            d["x1"] = arr(x.x1);
            d["x2"] = arr(x.x2);
            d["c1"] = arr(x.c1);
            return d;
          },
          py::arg("tiles"), py::arg("threads"),
          "The bank's js index in `tiles` tiles, built with the active ISA: a dict of arrays "
          "tile_rows, tile_offset (int64, tiles + 1), voff (int64, tiles x (cols + 1)), row "
          "(int32), x1, x2 (float64), c1 (float64, rows), for from_js_index.")
      .def_static(
          "from_js_index",
          [](py::dict a, long long rows, long long cols, double eps, const std::string& isa) {
            auto get = [&](const char* k) -> py::object {
              if (!a.contains(k)) throw py::value_error(std::string("stored js index: array '") + k + "' is missing");
              return a[k];
            };
            auto tr = require_array<int64_t>(get("tile_rows"), "tile_rows");
            auto to = require_array<int64_t>(get("tile_offset"), "tile_offset");
            auto vo = require_array<int64_t>(get("voff"), "voff");
            auto rw = require_array<int32_t>(get("row"), "row");
            auto x1 = require_array<double>(get("x1"), "x1");
            auto x2 = require_array<double>(get("x2"), "x2");
            auto c1 = require_array<double>(get("c1"), "c1");
            JsIndexView x;
            x.rows = rows;
            x.cols = cols;
            x.eps = eps;
            x.tiles = static_cast<int64_t>(tr.size()) - 1;
            const py::ssize_t n = rw.size();
            if (x.tiles < 1 || to.size() != tr.size() || vo.size() != x.tiles * (cols + 1) || x1.size() != n ||
                x2.size() != n || c1.size() != rows || to.data()[x.tiles] != n)
              throw py::value_error("stored js index: array sizes disagree (tiles " + std::to_string(x.tiles) +
                                    ", rows " + std::to_string(rows) + ", cols " + std::to_string(cols) +
                                    ", entries " + std::to_string(n) + ")");
            x.tile_rows = tr.data();
            x.tile_offset = to.data();
            x.voff = vo.data();
            x.row = rw.data();
            x.x1 = x1.data();
            x.x2 = x2.data();
            x.c1 = c1.data();
            return std::unique_ptr<PreparedHistograms>(PreparedHistograms::from_js_index(x, isa));
          },
          py::arg("arrays"), py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("isa"),
          py::keep_alive<0, 1>(),
          "A prepared bank over a stored js index (export_js_index's arrays, borrowed: the dict "
          "is kept alive with the result). Answers js only, on `isa` only.");
}

}  // namespace loramix::bind
