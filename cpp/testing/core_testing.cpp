// loramix._core_testing: hooks that let the tests reach internals of the compiled core which the
// production module loramix._core does not expose. Built only with -DLORAMIX_TESTING=ON
// (pyproject.toml turns it on for the pip build that CI runs; LORAMIX_RELEASE=1 turns it off);
// nothing in the library imports it. See docs/DEVELOPING.md, "The C++ core".
//
// This module links its own copy of the core, so it has its own active ISA: every kernel hook
// takes the ISA by name instead of reading loramix._core.active_isa().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "divergence_kernels.h"  // internal (cpp/src)
#include "loramix/cpu.h"
#include "loramix/halfconv.h"
#include "loramix/safetensors.h"

namespace py = pybind11;

namespace {

using namespace loramix;

Isa available(const std::string& name) {
  const Isa isa = parse_isa(name);  // std::invalid_argument -> ValueError
  if (!isa_available(isa)) throw py::value_error("ISA '" + name + "' is not available on this CPU/OS");
  return isa;
}

py::array_t<double> apply_log(const py::array_t<double, py::array::c_style>& x, LogF64Fn fn) {
  if (x.ndim() != 1) throw py::value_error("x: expected a 1-D float64 array");
  py::array_t<double> out(x.size());
  fn(x.data(), out.mutable_data(), static_cast<std::size_t>(x.size()));
  return out;
}

using F64Array = py::array_t<double, py::array::c_style>;

}  // namespace

PYBIND11_MODULE(_core_testing, m) {
  m.doc() = "loramix test hooks (not part of the API; built with LORAMIX_TESTING=ON)";

  m.def("divergence_log", [](const F64Array& x, const std::string& isa) {
    return apply_log(x, divergence_kernels(available(isa)).log_f64);
  }, py::arg("x").noconvert(), py::arg("isa"),
     "The log kernel of `isa` on a 1-D float64 array of positive finite values.");
  m.def("divergence_log_abs", [](const F64Array& x, const std::string& isa) {
    return apply_log(x, divergence_kernels(available(isa)).log_abs_f64);
  }, py::arg("x").noconvert(), py::arg("isa"),
     "The log of `isa`'s sparse js loop (0 < x <= 1; absolute error bound).");

  // build_sparse's per-entry js values of one row: (p, w, u) from its raw values x and their sum.
  m.def("divergence_js_row", [](const F64Array& x, double sum, double eps, const std::string& isa) {
    if (x.ndim() != 1) throw py::value_error("x: expected a 1-D float64 array");
    const std::size_t n = static_cast<std::size_t>(x.size());
    py::array_t<double> p(n), w(n), u(n);
    divergence_kernels(available(isa)).js_row_f64(x.data(), n, sum, eps, p.mutable_data(), w.mutable_data(),
                                                  u.mutable_data());
    return py::make_tuple(p, w, u);
  }, py::arg("x").noconvert(), py::arg("sum"), py::arg("eps"), py::arg("isa"),
     "js_row_f64 of `isa`: p = x/sum + eps, w and u of each entry (build_sparse, metric js).");

  // build_sparse's vector check of one CSR row: (all valid, count of values > 0).
  m.def("divergence_check_row", [](const py::array_t<int32_t, py::array::c_style>& idx, const F64Array& x,
                                   int64_t cols, const std::string& isa) {
    if (idx.ndim() != 1 || x.ndim() != 1 || idx.size() != x.size())
      throw py::value_error("idx, x: expected 1-D arrays of one length");
    int64_t npos = -1;
    const bool ok = divergence_kernels(available(isa)).check_row_f64(idx.data(), x.data(),
                                                                     static_cast<std::size_t>(x.size()), cols, &npos);
    return py::make_tuple(ok, npos);
  }, py::arg("idx").noconvert(), py::arg("x").noconvert(), py::arg("cols"), py::arg("isa"),
     "check_row_f64 of `isa`: (indices in range and increasing, values finite and >= 0; values > 0).");

  // Validates a whole file image held in memory (fuzz tests); returns the keys in file order.
  m.def("parse_safetensors_bytes", [](const py::bytes& data, const std::string& name) {
    std::string buf = data;
    std::vector<TensorInfo> ts;
    Metadata md;
    bool has_md = false;
    std::size_t start = 0;
    {
      py::gil_scoped_release release;
      parse_safetensors(reinterpret_cast<const uint8_t*>(buf.data()), buf.size(), name, &ts, &md,
                        &has_md, &start);
    }
    std::vector<std::string> keys;
    for (const auto& t : ts) keys.push_back(t.name);
    return keys;
  }, py::arg("data"), py::arg("name"));

  // The scalar source of truth for conversions (halfconv.h directly, no dispatch).
  m.def("scalar_f32_to_bf16", [](float x) { return f32_to_bf16_bits(x); }, py::arg("x"));
  m.def("scalar_f32_to_f16", [](float x) { return f32_to_f16_bits(x); }, py::arg("x"));
}
