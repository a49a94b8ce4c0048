// Bindings of the neural combiner's MLP kernels (loramix/mlp.h): float64 C-contiguous arrays only,
// shapes checked here, the GIL released around each pass (a pass takes milliseconds: no signal polling).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"
#include "loramix/mlp.h"

namespace loramix::bind {
namespace py = pybind11;

namespace {
using Arr = py::array_t<double, py::array::c_style>;

void check_len(const Arr& a, std::size_t n, const char* what) {
  if (static_cast<std::size_t>(a.size()) != n)
    throw py::value_error(std::string(what) + ": expected " + std::to_string(n) + " values, got " +
                          std::to_string(a.size()));
}

struct Shapes {
  std::size_t M, F, H;
};

Shapes shapes(const Arr& Z, const Arr& W1) {
  if (Z.ndim() != 2) throw py::value_error("Z must be 2-D (pairs, features)");
  if (W1.ndim() != 2 || W1.shape(0) != Z.shape(1)) throw py::value_error("W1 must be (features, hidden)");
  return {static_cast<std::size_t>(Z.shape(0)), static_cast<std::size_t>(Z.shape(1)),
          static_cast<std::size_t>(W1.shape(1))};
}
}  // namespace

void register_mlp(py::module_& m) {
  m.def("mlp_forward", [](const py::object& Zo, const py::object& W1o, const py::object& b1o, const py::object& w2o,
                          const py::object& skipo, const py::object& so, int threads) {
    auto Z = require_array<double>(Zo, "Z"), W1 = require_array<double>(W1o, "W1");
    auto b1 = require_array<double>(b1o, "b1"), w2 = require_array<double>(w2o, "w2");
    auto skip = require_array<double>(skipo, "skip"), s = require_array<double>(so, "s");
    const Shapes sh = shapes(Z, W1);
    check_len(b1, sh.H, "b1");
    check_len(w2, sh.H, "w2");
    check_len(skip, sh.F, "skip");
    check_len(s, sh.M, "s");
    if (!s.writeable()) throw py::value_error("s must be writeable");
    double* out = s.mutable_data();
    py::gil_scoped_release release;
    mlp_forward(Z.data(), sh.M, sh.F, W1.data(), b1.data(), w2.data(), skip.data(), sh.H, out, threads);
  }, py::arg("Z"), py::arg("W1"), py::arg("b1"), py::arg("w2"), py::arg("skip"), py::arg("s"), py::arg("threads") = 1,
     "s[m] = w2 . softsign(Z[m] @ W1 + b1) + Z[m] . skip, into s (M,); float64 C-contiguous arrays.");

  m.def("mlp_backward", [](const py::object& Zo, const py::object& W1o, const py::object& b1o, const py::object& w2o,
                           const py::object& dso, int threads) {
    auto Z = require_array<double>(Zo, "Z"), W1 = require_array<double>(W1o, "W1");
    auto b1 = require_array<double>(b1o, "b1"), w2 = require_array<double>(w2o, "w2");
    auto ds = require_array<double>(dso, "ds");
    const Shapes sh = shapes(Z, W1);
    check_len(b1, sh.H, "b1");
    check_len(w2, sh.H, "w2");
    check_len(ds, sh.M, "ds");
    Arr gW1({sh.F, sh.H}), gb1(sh.H), gw2(sh.H), gskip(sh.F);
    double *p1 = gW1.mutable_data(), *p2 = gb1.mutable_data(), *p3 = gw2.mutable_data(), *p4 = gskip.mutable_data();
    {
      py::gil_scoped_release release;
      mlp_backward(Z.data(), sh.M, sh.F, W1.data(), b1.data(), w2.data(), sh.H, ds.data(), p1, p2, p3, p4, threads);
    }
    return py::make_tuple(gW1, gb1, gw2, gskip);
  }, py::arg("Z"), py::arg("W1"), py::arg("b1"), py::arg("w2"), py::arg("ds"), py::arg("threads") = 1,
     "Gradients (gW1, gb1, gw2, gskip) of sum(ds * s) for the MLP of mlp_forward; thread-count independent.");
}

}  // namespace loramix::bind
