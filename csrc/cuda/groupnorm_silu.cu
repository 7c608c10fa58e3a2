// Fused GroupNorm + SiLU on CUDA: forward, and a backward that skips the samples whose gradient is
// known to be zero (the teacher rows of a fused CAT step).
//
// Semantics (catfast/reference/groupnorm_silu.py is the spec), x [n, c, hw], groups g:
//   xhat = (x - mean_g) * rstd_g,  z = xhat * gamma_c + beta_c,  y = z * sigmoid(z)
// statistics in fp32 (biased variance, as torch.nn.GroupNorm), y rounded once to x's dtype.
// Backward, dz = dy * sigmoid(z) * (1 + z * (1 - sigmoid(z))), dxhat = dz * gamma_c:
//   dx = rstd_g * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat))
//   dgamma_c = sum dz * xhat, dbeta_c = sum dz (over samples and positions)
//
// One block per (sample, channel) in every kernel, so a 64x64 SD1.5 feature map at 320 channels gives
// n * 320 blocks of 4096 elements (enough blocks to fill an H100 at batch 1), and per-channel partial
// sums that the next kernel combines per group:
//   forward:  stats (mean and M2 of each channel, two passes over the channel, which stays in L1)
//             -> apply (combines its group's channels with Chan's formula, writes y).
//   backward: reduce (sum dz, sum dz * xhat per channel) -> dx (group sums from the partials).
// Against torch (group_norm, then silu; backward through both): x is read twice and y written once in
// forward instead of three reads and two writes, and the GroupNorm output is never stored for backward.
#include "common.cuh"

namespace catfast_cuda {
namespace {

constexpr int kThreads = 256;

struct GroupStats {
  float mean;
  float rstd;
};

// Mean and rstd of group (i, gi) from the per-channel partials (each over hw elements).
__device__ __forceinline__ GroupStats combine_group(const float* part_mean, const float* part_m2, int64_t i,
                                                    int64_t gi, int64_t c, int64_t cpg, int64_t hw, float eps) {
  const float* pm = part_mean + i * c + gi * cpg;
  const float* p2 = part_m2 + i * c + gi * cpg;
  float mean = 0.f;
  for (int64_t j = 0; j < cpg; ++j) mean += pm[j];
  mean /= static_cast<float>(cpg);
  float m2 = 0.f;
  for (int64_t j = 0; j < cpg; ++j) {
    const float d = pm[j] - mean;
    m2 += p2[j] + static_cast<float>(hw) * d * d;
  }
  const float var = fmaxf(m2 / static_cast<float>(cpg * hw), 0.f);
  return {mean, rsqrtf(var + eps)};
}

__device__ __forceinline__ float affine(const void* p, int64_t ch, int32_t dtype, float fallback) {
  return p == nullptr ? fallback : load_any(p, ch, dtype);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gn_stats_kernel(const T* __restrict__ x, int64_t hw,
                                                            float* __restrict__ part_mean, float* __restrict__ part_m2) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;  // sample * c + channel
  const T* xr = x + row * hw;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < hw; j += kThreads) s += to_float(xr[j]);
  const float mean = block_sum(s, scratch) / static_cast<float>(hw);
  float m2 = 0.f;
  for (int64_t j = threadIdx.x; j < hw; j += kThreads) {
    const float d = to_float(xr[j]) - mean;
    m2 = fmaf(d, d, m2);
  }
  m2 = block_sum(m2, scratch);
  if (threadIdx.x == 0) {
    part_mean[row] = mean;
    part_m2[row] = m2;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_silu_apply_kernel(const T* __restrict__ x, const void* gamma, const void* beta, int32_t affine_dtype, int64_t c,
                         int64_t g, int64_t hw, float eps, const float* __restrict__ part_mean,
                         const float* __restrict__ part_m2, T* __restrict__ y, float* __restrict__ mean_out,
                         float* __restrict__ rstd_out) {
  const int64_t row = blockIdx.x;
  const int64_t i = row / c, ch = row % c, cpg = c / g, gi = ch / cpg;
  const GroupStats st = combine_group(part_mean, part_m2, i, gi, c, cpg, hw, eps);
  const float scale = st.rstd * affine(gamma, ch, affine_dtype, 1.f);
  const float shift = affine(beta, ch, affine_dtype, 0.f) - st.mean * scale;
  const T* xr = x + row * hw;
  T* yr = y + row * hw;
  for (int64_t j = threadIdx.x; j < hw; j += kThreads) {
    const float z = fmaf(to_float(xr[j]), scale, shift);
    yr[j] = from_float<T>(z * sigmoidf_(z));
  }
  if (threadIdx.x == 0 && ch % cpg == 0) {
    mean_out[i * g + gi] = st.mean;
    rstd_out[i * g + gi] = st.rstd;
  }
}

// dz at one element, and xhat (both fp32).
__device__ __forceinline__ float silu_grad(float dy, float z) {
  const float sg = sigmoidf_(z);
  return dy * sg * fmaf(z, 1.f - sg, 1.f);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_silu_bwd_reduce_kernel(const T* __restrict__ dy, const T* __restrict__ x, const void* gamma, const void* beta,
                              int32_t affine_dtype, const float* __restrict__ mean, const float* __restrict__ rstd,
                              const uint8_t* __restrict__ row_mask, int64_t c, int64_t g, int64_t hw,
                              float* __restrict__ dgamma_part, float* __restrict__ dbeta_part) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t i = row / c, ch = row % c, gi = ch / (c / g);
  if (row_mask != nullptr && row_mask[i] == 0) {  // uniform over the block: returns before any barrier
    if (threadIdx.x == 0) {
      dgamma_part[row] = 0.f;
      dbeta_part[row] = 0.f;
    }
    return;
  }
  const float mu = mean[i * g + gi], rs = rstd[i * g + gi];
  const float gam = affine(gamma, ch, affine_dtype, 1.f), bet = affine(beta, ch, affine_dtype, 0.f);
  const T* xr = x + row * hw;
  const T* dyr = dy + row * hw;
  float sum_dz = 0.f, sum_dz_xhat = 0.f;
  for (int64_t j = threadIdx.x; j < hw; j += kThreads) {
    const float xhat = (to_float(xr[j]) - mu) * rs;
    const float dz = silu_grad(to_float(dyr[j]), fmaf(xhat, gam, bet));
    sum_dz += dz;
    sum_dz_xhat = fmaf(dz, xhat, sum_dz_xhat);
  }
  sum_dz = block_sum(sum_dz, scratch);
  sum_dz_xhat = block_sum(sum_dz_xhat, scratch);
  if (threadIdx.x == 0) {
    dgamma_part[row] = sum_dz_xhat;
    dbeta_part[row] = sum_dz;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_silu_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const void* gamma, const void* beta,
                          int32_t affine_dtype, const float* __restrict__ mean, const float* __restrict__ rstd,
                          const uint8_t* __restrict__ row_mask, int64_t c, int64_t g, int64_t hw,
                          const float* __restrict__ dgamma_part, const float* __restrict__ dbeta_part,
                          T* __restrict__ dx) {
  const int64_t row = blockIdx.x;
  const int64_t i = row / c, ch = row % c, cpg = c / g, gi = ch / cpg;
  T* dxr = dx + row * hw;
  if (row_mask != nullptr && row_mask[i] == 0) {
    const T zero = from_float<T>(0.f);
    for (int64_t j = threadIdx.x; j < hw; j += kThreads) dxr[j] = zero;
    return;
  }
  // sum over the group of dxhat and of dxhat * xhat: gamma_c times the channel partials
  float sum_dxhat = 0.f, sum_dxhat_xhat = 0.f;
  for (int64_t j = 0; j < cpg; ++j) {
    const int64_t cj = gi * cpg + j;
    const float gj = affine(gamma, cj, affine_dtype, 1.f);
    sum_dxhat = fmaf(gj, dbeta_part[i * c + cj], sum_dxhat);
    sum_dxhat_xhat = fmaf(gj, dgamma_part[i * c + cj], sum_dxhat_xhat);
  }
  const float inv_m = 1.f / static_cast<float>(cpg * hw);
  const float mean_dxhat = sum_dxhat * inv_m, mean_dxhat_xhat = sum_dxhat_xhat * inv_m;
  const float mu = mean[i * g + gi], rs = rstd[i * g + gi];
  const float gam = affine(gamma, ch, affine_dtype, 1.f), bet = affine(beta, ch, affine_dtype, 0.f);
  const T* xr = x + row * hw;
  const T* dyr = dy + row * hw;
  for (int64_t j = threadIdx.x; j < hw; j += kThreads) {
    const float xhat = (to_float(xr[j]) - mu) * rs;
    const float dxhat = silu_grad(to_float(dyr[j]), fmaf(xhat, gam, bet)) * gam;
    dxr[j] = from_float<T>(rs * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
  }
}

template <typename T>
cudaError_t fwd(const void* x, const void* gamma, const void* beta, int32_t affine_dtype, int64_t n, int64_t c,
                int64_t g, int64_t hw, float eps, float* part_mean, float* part_m2, void* y, float* mean, float* rstd,
                cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(n * c);
  gn_stats_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), hw, part_mean, part_m2);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gn_silu_apply_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), gamma, beta, affine_dtype, c, g,
                                                           hw, eps, part_mean, part_m2, static_cast<T*>(y), mean,
                                                           rstd);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* dy, const void* x, const void* gamma, const void* beta, int32_t affine_dtype,
                const float* mean, const float* rstd, const uint8_t* row_mask, int64_t n, int64_t c, int64_t g,
                int64_t hw, float* dgamma_part, float* dbeta_part, void* dx, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(n * c);
  gn_silu_bwd_reduce_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                                gamma, beta, affine_dtype, mean, rstd, row_mask, c, g,
                                                                hw, dgamma_part, dbeta_part);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gn_silu_bwd_dx_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), gamma,
                                                            beta, affine_dtype, mean, rstd, row_mask, c, g, hw,
                                                            dgamma_part, dbeta_part, static_cast<T*>(dx));
  return cudaGetLastError();
}

bool bad_shape(int64_t n, int64_t c, int64_t g, int64_t hw) {
  return n <= 0 || c <= 0 || g <= 0 || hw <= 0 || c % g != 0 || n * c > 0x7fffffffLL;
}

}  // namespace

cudaError_t launch_group_norm_silu_fwd(const void* x, int32_t x_dtype, const void* gamma, const void* beta,
                                       int32_t affine_dtype, int64_t n, int64_t c, int64_t g, int64_t hw, float eps,
                                       float* part_mean, float* part_m2, void* y, float* mean, float* rstd,
                                       cudaStream_t stream) {
  if (bad_shape(n, c, g, hw)) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case kF16:
      return fwd<__half>(x, gamma, beta, affine_dtype, n, c, g, hw, eps, part_mean, part_m2, y, mean, rstd, stream);
    case kBF16:
      return fwd<__nv_bfloat16>(x, gamma, beta, affine_dtype, n, c, g, hw, eps, part_mean, part_m2, y, mean, rstd,
                                stream);
    default:
      return fwd<float>(x, gamma, beta, affine_dtype, n, c, g, hw, eps, part_mean, part_m2, y, mean, rstd, stream);
  }
}

cudaError_t launch_group_norm_silu_bwd(const void* dy, const void* x, int32_t x_dtype, const void* gamma,
                                       const void* beta, int32_t affine_dtype, const float* mean, const float* rstd,
                                       const uint8_t* row_mask, int64_t n, int64_t c, int64_t g, int64_t hw,
                                       float* dgamma_part, float* dbeta_part, void* dx, cudaStream_t stream) {
  if (bad_shape(n, c, g, hw)) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case kF16:
      return bwd<__half>(dy, x, gamma, beta, affine_dtype, mean, rstd, row_mask, n, c, g, hw, dgamma_part, dbeta_part,
                         dx, stream);
    case kBF16:
      return bwd<__nv_bfloat16>(dy, x, gamma, beta, affine_dtype, mean, rstd, row_mask, n, c, g, hw, dgamma_part,
                                dbeta_part, dx, stream);
    default:
      return bwd<float>(dy, x, gamma, beta, affine_dtype, mean, rstd, row_mask, n, c, g, hw, dgamma_part, dbeta_part,
                        dx, stream);
  }
}

}  // namespace catfast_cuda
