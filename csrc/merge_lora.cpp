// In-place multi-layer LoRA merge on the CPU: for every layer i, W_i += s_i * (B_i @ A_i).
//
// Semantics (catfast/reference/merge.py::merge_lora_ref_ is the spec):
//   W: [out, in] (Linear) or [out, in, kh, kw] (Conv2d), float32 / float16 / bfloat16, contiguous
//   A ("down"): [r, in] or [r, in, kh, kw];  B ("up"): [out, r] or [out, r, 1, 1]; any float dtype
//   W <- cast(float(W) + s * (float(B) @ float(A)))          one rounding per element
// The delta is accumulated in fp32 and W is rounded once, so a bf16/fp16 merge is never worse than
// torch's `W += s * (B @ A)` (which rounds B @ A to the low dtype first, then rounds the sum).
// All layers go into one parallel_for over (layer, row-block) work items, so a whole UNet's worth
// of small layers is one call instead of hundreds of launches.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

#include "checks.h"

namespace {

constexpr int64_t kRowsPerItem = 8;

struct LayerView {
  at::Tensor weight;  // [out, K] view of W, original dtype
  at::Tensor down;    // [r, K] float32, contiguous
  at::Tensor up;      // [out, r] float32, contiguous, already multiplied by the scale
  int64_t out, k, rank;
};

template <typename scalar_t>
void merge_rows(const LayerView& layer, int64_t row_begin, int64_t row_end, std::vector<float>& delta) {
  scalar_t* w = layer.weight.data_ptr<scalar_t>();
  const float* a = layer.down.data_ptr<float>();
  const float* b = layer.up.data_ptr<float>();
  const int64_t k_len = layer.k;
  for (int64_t row = row_begin; row < row_end; ++row) {
    std::fill(delta.begin(), delta.end(), 0.0f);
    for (int64_t j = 0; j < layer.rank; ++j) {
      const float coef = b[row * layer.rank + j];
      if (coef == 0.0f) continue;
      const float* a_row = a + j * k_len;
      float* d = delta.data();
      for (int64_t c = 0; c < k_len; ++c) d[c] += coef * a_row[c];
    }
    scalar_t* w_row = w + row * k_len;
    for (int64_t c = 0; c < k_len; ++c) w_row[c] = static_cast<scalar_t>(static_cast<float>(w_row[c]) + delta[c]);
  }
}

LayerView make_view(int64_t i, const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, double scale) {
  CATFAST_CHECK_CPU(weight);
  CATFAST_CHECK_CONTIGUOUS(weight);
  CATFAST_CHECK_FLOATING(weight);
  CATFAST_CHECK_CPU(down);
  CATFAST_CHECK_CPU(up);
  CATFAST_CHECK_FLOATING(down);
  CATFAST_CHECK_FLOATING(up);
  TORCH_CHECK(weight.dim() >= 2, "layer ", i, ": weight must have at least 2 dims, got ", weight.sizes());
  TORCH_CHECK(down.dim() >= 2 && up.dim() >= 2, "layer ", i, ": down and up must have at least 2 dims");
  const int64_t out = weight.size(0);
  const int64_t k = weight.numel() / out;
  const int64_t rank = down.size(0);
  TORCH_CHECK(up.size(0) == out, "layer ", i, ": up ", up.sizes(), " does not match weight ", weight.sizes());
  TORCH_CHECK(up.numel() == out * rank, "layer ", i, ": up ", up.sizes(), " must be [out, r(,1,1)] with r=", rank);
  TORCH_CHECK(down.numel() == rank * k, "layer ", i, ": down ", down.sizes(), " does not match weight ",
              weight.sizes());
  LayerView view;
  view.weight = weight.view({out, k});
  view.down = down.to(at::kFloat).contiguous().view({rank, k});
  view.up = (up.to(at::kFloat).reshape({out, rank}) * scale).contiguous();
  view.out = out;
  view.k = k;
  view.rank = rank;
  return view;
}

}  // namespace

void merge_lora_(std::vector<at::Tensor> weights, std::vector<at::Tensor> downs, std::vector<at::Tensor> ups,
                 std::vector<double> scales) {
  const size_t n = weights.size();
  TORCH_CHECK(downs.size() == n && ups.size() == n && scales.size() == n,
              "merge_lora_: weights, downs, ups and scales must have the same length, got ", n, ", ", downs.size(),
              ", ", ups.size(), ", ", scales.size());
  // Validate every layer before writing any: a bad layer must leave all weights untouched.
  std::vector<LayerView> layers;
  layers.reserve(n);
  for (size_t i = 0; i < n; ++i) layers.push_back(make_view(static_cast<int64_t>(i), weights[i], downs[i], ups[i], scales[i]));

  std::vector<std::pair<int64_t, int64_t>> items;  // (layer, first row)
  for (size_t i = 0; i < n; ++i)
    for (int64_t row = 0; row < layers[i].out; row += kRowsPerItem) items.emplace_back(static_cast<int64_t>(i), row);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> delta;
    for (int64_t it = begin; it < end; ++it) {
      const LayerView& layer = layers[items[it].first];
      const int64_t row0 = items[it].second;
      const int64_t row1 = std::min(row0 + kRowsPerItem, layer.out);
      delta.resize(layer.k);
      switch (layer.weight.scalar_type()) {
        case at::kFloat: merge_rows<float>(layer, row0, row1, delta); break;
        case at::kHalf: merge_rows<at::Half>(layer, row0, row1, delta); break;
        case at::kBFloat16: merge_rows<at::BFloat16>(layer, row0, row1, delta); break;
        default: TORCH_CHECK(false, "unreachable dtype");
      }
    }
  });
}
