// Placeholder: filled by safetensors I/O and streamed weighted sums.
#include <pybind11/pybind11.h>
namespace loramix::bind {
void register_tensors(pybind11::module_&) {}
}  // namespace loramix::bind
