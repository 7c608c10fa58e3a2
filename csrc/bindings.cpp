// pybind11 module catfast._C: m.def lines only. Semantics live with each op's source and its
// pure-torch reference in catfast/reference/.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("merge_lora_", &merge_lora_, "In place, for every layer i: W_i += s_i * B_i @ A_i (CPU, fp32 accumulate)",
        py::arg("weights"), py::arg("downs"), py::arg("ups"), py::arg("scales"));
  m.def("swap_lora_", &swap_lora_,
        "In place, for every layer i: W_i += s_in_i * B_in_i @ A_in_i - s_out_i * B_out_i @ A_out_i (CPU, one GEMM)",
        py::arg("weights"), py::arg("downs_out"), py::arg("ups_out"), py::arg("scales_out"), py::arg("downs_in"),
        py::arg("ups_in"), py::arg("scales_in"));
  m.def("cat_loss_cpu", &cat_loss_cpu, "Fused CAT loss: ((total, ldm, cat), d ldm/d pred, d cat/d pred_stripped)",
        py::arg("pred"), py::arg("target"), py::arg("pred_stripped"), py::arg("teacher"), py::arg("weights"),
        py::arg("cat_weight"));
  m.def("group_norm_silu_fwd_cpu", &group_norm_silu_fwd_cpu, "silu(group_norm(x)): (y, mean, rstd)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("num_groups"), py::arg("eps"));
  m.def("group_norm_silu_bwd_cpu", &group_norm_silu_bwd_cpu, "(dx, dweight, dbias) for the rows of row_mask",
        py::arg("grad_output"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
        py::arg("row_mask"), py::arg("num_groups"));
#ifdef CATFAST_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("merge_lora_cuda_", &merge_lora_cuda_,
        "In place on CUDA, one launch: W_i += s_i B_i @ A_i (+ s2_i B2_i @ A2_i when the second lists are given)",
        py::arg("weights"), py::arg("downs"), py::arg("ups"), py::arg("scales"), py::arg("downs2"), py::arg("ups2"),
        py::arg("scales2"));
  m.def("cat_loss_cuda", &cat_loss_cuda, "Fused CAT loss on CUDA (see cat_loss_cpu)", py::arg("pred"),
        py::arg("target"), py::arg("pred_stripped"), py::arg("teacher"), py::arg("weights"), py::arg("cat_weight"));
  m.def("group_norm_silu_fwd_cuda", &group_norm_silu_fwd_cuda, "silu(group_norm(x)) on CUDA: (y, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("num_groups"), py::arg("eps"));
  m.def("group_norm_silu_bwd_cuda", &group_norm_silu_bwd_cuda, "(dx, dweight, dbias) on CUDA for the rows of row_mask",
        py::arg("grad_output"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
        py::arg("row_mask"), py::arg("num_groups"));
#else
  m.attr("has_cuda") = false;
#endif
}
