// Placeholder: filled by the divergence kernels.
#include <pybind11/pybind11.h>
namespace loramix::bind {
void register_divergence(pybind11::module_&) {}
}  // namespace loramix::bind
