// The fused CAT loss on the CPU: L_LDM, L_CAT, per-sample weights and both gradients in one pass over
// the predictions. Semantics: catfast/reference/cat_loss.py (the CUDA twin: csrc/cuda/cat_loss.cu).
//   ldm_i = mean_d (pred - target)^2, cat_i = mean_d (pred_s - teacher)^2, ldm = mean_i w_i ldm_i, ...
//   out = (ldm + cat_weight * cat, ldm, cat); g_ldm = 2 w_i (pred - target) / (b d), g_cat likewise (fp32)
// Inputs are read as fp32 (a bf16/fp16 prediction is converted once). Chunks of one sample are summed
// with 16 independent accumulators (vectorised by the compiler) in parallel, then in a fixed order.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <optional>
#include <vector>

#include "checks.h"

namespace {

constexpr int64_t kChunk = 4096;

__attribute__((target_clones("avx512f", "avx2", "default"))) float sq_grad(const float* p, const float* q, float* g,
                                                                           int64_t len, float coef) {
  float acc[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    for (int u = 0; u < 16; ++u) {
      const float d = p[j + u] - q[j + u];
      g[j + u] = coef * d;
      acc[u] += d * d;
    }
  }
  float tail = 0.f;
  for (; j < len; ++j) {
    const float d = p[j] - q[j];
    g[j] = coef * d;
    tail += d * d;
  }
  for (int u = 0; u < 16; ++u) tail += acc[u];
  return tail;
}

at::Tensor as_float(const at::Tensor& t, const at::Tensor& pred, const char* name) {
  CATFAST_CHECK_CPU(t);
  TORCH_CHECK(t.sizes() == pred.sizes(), name, " ", t.sizes(), " must have pred's shape ", pred.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  return t.to(at::kFloat);
}

}  // namespace

std::vector<at::Tensor> cat_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                     const std::optional<at::Tensor>& pred_stripped,
                                     const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& weights,
                                     double cat_weight) {
  TORCH_CHECK(pred.dim() >= 1 && pred.numel() > 0, "pred must be a non-empty [B, ...] tensor, got ", pred.sizes());
  TORCH_CHECK(pred_stripped.has_value() == teacher.has_value(), "pred_stripped and teacher come together");
  const int64_t b = pred.size(0), d = pred.numel() / b;
  const at::Tensor p = as_float(pred, pred, "pred"), t = as_float(target, pred, "target");
  const bool with_cat = pred_stripped.has_value();
  const at::Tensor ps = with_cat ? as_float(*pred_stripped, pred, "pred_stripped") : at::Tensor();
  const at::Tensor te = with_cat ? as_float(*teacher, pred, "teacher") : at::Tensor();
  std::vector<float> w(static_cast<size_t>(b), 1.f);
  if (weights.has_value()) {
    const at::Tensor& wt = *weights;
    CATFAST_CHECK_CPU(wt);
    TORCH_CHECK(wt.scalar_type() == at::kFloat && wt.dim() == 1 && wt.size(0) == b && wt.is_contiguous(),
                "weights must be a contiguous float32 [B] = [", b, "], got ", wt.scalar_type(), " ", wt.sizes());
    std::copy(wt.data_ptr<float>(), wt.data_ptr<float>() + b, w.begin());
  }
  at::Tensor g_ldm = at::empty(pred.sizes(), p.options());
  at::Tensor g_cat = with_cat ? at::empty(pred.sizes(), p.options()) : at::Tensor();
  const int64_t splits = (d + kChunk - 1) / kChunk;
  std::vector<float> part(static_cast<size_t>(2 * b * splits), 0.f);
  const float* pp = p.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const float* psp = with_cat ? ps.data_ptr<float>() : nullptr;
  const float* tep = with_cat ? te.data_ptr<float>() : nullptr;
  float* gl = g_ldm.data_ptr<float>();
  float* gc = with_cat ? g_cat.data_ptr<float>() : nullptr;
  const float bd = static_cast<float>(b) * static_cast<float>(d);
  at::parallel_for(0, b * splits, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t i = blk / splits, s = blk % splits;
      const int64_t begin = i * d + s * kChunk, len = std::min(kChunk, d - s * kChunk);
      const float coef = 2.f * w[static_cast<size_t>(i)] / bd;
      part[2 * blk] = sq_grad(pp + begin, tp + begin, gl + begin, len, coef);
      if (with_cat) part[2 * blk + 1] = sq_grad(psp + begin, tep + begin, gc + begin, len, coef);
    }
  });
  float ldm = 0.f, cat = 0.f;
  for (int64_t i = 0; i < b; ++i) {
    float sl = 0.f, sc = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      sl += part[2 * (i * splits + s)];
      sc += part[2 * (i * splits + s) + 1];
    }
    ldm += w[static_cast<size_t>(i)] * (sl / static_cast<float>(d));
    cat += w[static_cast<size_t>(i)] * (sc / static_cast<float>(d));
  }
  ldm /= static_cast<float>(b);
  cat /= static_cast<float>(b);
  at::Tensor out = at::empty({3}, p.options());
  float* o = out.data_ptr<float>();
  o[0] = ldm + static_cast<float>(cat_weight) * cat;
  o[1] = ldm;
  o[2] = cat;
  return {out, g_ldm, g_cat};
}
