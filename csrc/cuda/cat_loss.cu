// The fused CAT loss on CUDA: L_LDM, L_CAT, their per-sample weights and both gradients, reading each
// input once.
//
// Semantics (catfast/reference/cat_loss.py is the spec; catfast/train/objective.py computes the same
// loss from the UNet's predictions), predictions [b, d]:
//   ldm_i = mean_d (pred - target)^2,  cat_i = mean_d (pred_s - sg(teacher))^2
//   ldm = mean_i w_i ldm_i,  cat = mean_i w_i cat_i,  total = ldm + cat_weight * cat   (w = 1 without weights)
//   g_ldm = d ldm / d pred = 2 w_i (pred - target) / (b d),  g_cat = d cat / d pred_s likewise (fp32)
// The teacher is a constant (stop-gradient): no gradient is formed for it.
//
// Launches: one kernel over (sample, split) blocks that writes both gradients and each block's two
// partial sums of squares, then a one-block kernel that sums the partials in a fixed order (no atomics:
// the same inputs give the same loss bit for bit) and applies the weights. torch computes the same
// with about a dozen launches (two mse_loss forwards and backwards, the weighting, the sum).
#include "common.cuh"

namespace catfast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kPerBlock = kThreads * 8;  // elements of one sample per block

__device__ __forceinline__ float sq_diff_grad(const void* p, int32_t pd, const void* q, int32_t qd, int64_t idx,
                                              float coef, float* g) {
  const float diff = load_any(p, idx, pd) - load_any(q, idx, qd);
  g[idx] = coef * diff;
  return diff * diff;
}

__global__ void __launch_bounds__(kThreads)
    cat_loss_kernel(const void* pred, int32_t pred_dtype, const void* target, int32_t target_dtype, const void* pred_s,
                    int32_t pred_s_dtype, const void* teacher, int32_t teacher_dtype, const float* weights, int64_t b,
                    int64_t d, int32_t splits, float* part, float* g_ldm, float* g_cat) {
  __shared__ float scratch[32];
  const int64_t i = blockIdx.x / splits;
  const int32_t split = blockIdx.x % splits;
  const float w = weights == nullptr ? 1.f : weights[i];
  const float coef = 2.f * w / (static_cast<float>(b) * static_cast<float>(d));
  const int64_t begin = i * d + split * kPerBlock;
  const int64_t end = i * d + min(d, (split + 1) * kPerBlock);
  float sq_ldm = 0.f, sq_cat = 0.f;
  for (int64_t idx = begin + threadIdx.x; idx < end; idx += kThreads) {
    sq_ldm += sq_diff_grad(pred, pred_dtype, target, target_dtype, idx, coef, g_ldm);
    if (pred_s != nullptr) sq_cat += sq_diff_grad(pred_s, pred_s_dtype, teacher, teacher_dtype, idx, coef, g_cat);
  }
  sq_ldm = block_sum(sq_ldm, scratch);
  sq_cat = block_sum(sq_cat, scratch);
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = sq_ldm;
    part[2 * blockIdx.x + 1] = sq_cat;
  }
}

__global__ void __launch_bounds__(kThreads)
    cat_loss_finish_kernel(const float* part, const float* weights, int64_t b, int64_t d, int32_t splits,
                           float cat_weight, float* out) {
  __shared__ float scratch[32];
  float ldm = 0.f, cat = 0.f;
  for (int64_t i = threadIdx.x; i < b; i += kThreads) {
    float sl = 0.f, sc = 0.f;
    for (int32_t s = 0; s < splits; ++s) {
      sl += part[2 * (i * splits + s)];
      sc += part[2 * (i * splits + s) + 1];
    }
    const float w = weights == nullptr ? 1.f : weights[i];
    ldm += w * (sl / static_cast<float>(d));
    cat += w * (sc / static_cast<float>(d));
  }
  ldm = block_sum(ldm, scratch) / static_cast<float>(b);
  cat = block_sum(cat, scratch) / static_cast<float>(b);
  if (threadIdx.x == 0) {
    out[0] = ldm + cat_weight * cat;
    out[1] = ldm;
    out[2] = cat;
  }
}

}  // namespace

int32_t cat_loss_splits(int64_t d) { return static_cast<int32_t>((d + kPerBlock - 1) / kPerBlock); }

cudaError_t launch_cat_loss(const void* pred, int32_t pred_dtype, const void* target, int32_t target_dtype,
                            const void* pred_s, int32_t pred_s_dtype, const void* teacher, int32_t teacher_dtype,
                            const float* weights, int64_t b, int64_t d, float cat_weight, float* part, float* g_ldm,
                            float* g_cat, float* out, cudaStream_t stream) {
  if (b <= 0 || d <= 0) return cudaErrorInvalidValue;
  const int32_t splits = cat_loss_splits(d);
  if (b * splits > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  cat_loss_kernel<<<static_cast<unsigned int>(b * splits), kThreads, 0, stream>>>(
      pred, pred_dtype, target, target_dtype, pred_s, pred_s_dtype, teacher, teacher_dtype, weights, b, d, splits, part,
      g_ldm, g_cat);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  cat_loss_finish_kernel<<<1, kThreads, 0, stream>>>(part, weights, b, d, splits, cat_weight, out);
  return cudaGetLastError();
}

}  // namespace catfast_cuda
