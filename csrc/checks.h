// Argument checks shared by catfast's C++ ops. Each failure names the argument and what was expected.
#pragma once
#include <torch/extension.h>

#define CATFAST_CHECK_CPU(x) TORCH_CHECK(!(x).is_cuda() && (x).device().is_cpu(), #x " must be a CPU tensor")
#define CATFAST_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CATFAST_CHECK_FLOATING(x)                                                                   \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                \
                  (x).scalar_type() == at::kBFloat16,                                               \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
