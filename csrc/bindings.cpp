// pybind11 module catfast._C: m.def lines only. Semantics live with each op's source and its
// pure-torch reference in catfast/reference/.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("merge_lora_", &merge_lora_, "In place, for every layer i: W_i += s_i * B_i @ A_i (CPU, fp32 accumulate)",
        py::arg("weights"), py::arg("downs"), py::arg("ups"), py::arg("scales"));
}
