// Declarations of catfast's C++ ops; each is defined in its own .cpp (CPU) or csrc/cuda/ (CUDA) file.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

// CPU (csrc/*.cpp)
void merge_lora_(std::vector<at::Tensor> weights, std::vector<at::Tensor> downs, std::vector<at::Tensor> ups,
                 std::vector<double> scales);
void swap_lora_(std::vector<at::Tensor> weights, std::vector<at::Tensor> downs_out, std::vector<at::Tensor> ups_out,
                std::vector<double> scales_out, std::vector<at::Tensor> downs_in, std::vector<at::Tensor> ups_in,
                std::vector<double> scales_in);
std::vector<at::Tensor> cat_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                     const std::optional<at::Tensor>& pred_stripped,
                                     const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& weights,
                                     double cat_weight);
std::vector<at::Tensor> group_norm_silu_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, int64_t num_groups, double eps);
std::vector<at::Tensor> group_norm_silu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                const at::Tensor& rstd, const std::optional<at::Tensor>& row_mask,
                                                int64_t num_groups);

#ifdef CATFAST_WITH_CUDA
// CUDA (csrc/cuda/ops_cuda.cpp over the kernels of csrc/cuda/*.cu); the second adapter lists may be empty
void merge_lora_cuda_(std::vector<at::Tensor> weights, std::vector<at::Tensor> downs, std::vector<at::Tensor> ups,
                      std::vector<double> scales, std::vector<at::Tensor> downs2, std::vector<at::Tensor> ups2,
                      std::vector<double> scales2);
std::vector<at::Tensor> group_norm_silu_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, int64_t num_groups, double eps);
std::vector<at::Tensor> group_norm_silu_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                 const at::Tensor& rstd, const std::optional<at::Tensor>& row_mask,
                                                 int64_t num_groups);
std::vector<at::Tensor> cat_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                      const std::optional<at::Tensor>& pred_stripped,
                                      const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& weights,
                                      double cat_weight);
#endif
