// The pybind11 module loramix._core. Each part registers itself from its own file; this one
// only holds info() and ISA control.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "loramix/cpu.h"
#include "loramix/parallel.h"

namespace py = pybind11;

namespace loramix::bind {
void register_divergence(py::module_& m);
void register_tensors(py::module_& m);
void register_mlp(py::module_& m);
}  // namespace loramix::bind

PYBIND11_MODULE(_core, m) {
  using namespace loramix;
  m.doc() = "loramix compiled core: SIMD kernels and safetensors I/O";
#ifdef LORAMIX_VERSION
  m.attr("__version__") = LORAMIX_VERSION;
#endif

  m.def("compiled_isas", [] {
    std::vector<std::string> out;
    for (Isa i : compiled_isas()) out.emplace_back(isa_name(i));
    return out;
  }, "ISAs compiled into this build.");
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (Isa i : available_isas()) out.emplace_back(isa_name(i));
    return out;
  }, "ISAs compiled in and supported by this CPU and OS.");
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "The ISA kernels dispatch to (LORAMIX_ISA overrides the best available one).");
  m.def("set_active_isa", [](const std::string& name) { set_active_isa(parse_isa(name)); },
        py::arg("isa"), "Force an ISA; raises RuntimeError if this CPU/OS cannot run it.");
  m.def("default_threads", &default_threads,
        "Threads used when threads=None: LORAMIX_NUM_THREADS or the core count.");
  m.def("cpu_features", [] {
    const auto& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["avx512"] = f.avx512;
    d["avx512_bf16"] = f.avx512_bf16;
    return d;
  });

  py::register_exception<Cancelled>(m, "Cancelled", PyExc_KeyboardInterrupt);

  bind::register_divergence(m);
  bind::register_tensors(m);
  bind::register_mlp(m);
}
