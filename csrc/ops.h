// Declarations of catfast's C++ ops; each is defined in its own .cpp/.cu file.
#pragma once
#include <torch/extension.h>

#include <vector>

void merge_lora_(std::vector<at::Tensor> weights, std::vector<at::Tensor> downs, std::vector<at::Tensor> ups,
                 std::vector<double> scales);
