// Launchers of catfast's CUDA kernels: plain C++ and CUDA runtime types only, no torch. The .cu files
// that define them include nothing from torch, so CI compiles exactly this kernel code with the
// machine's nvcc (csrc/check_cuda_compile.sh); csrc/cuda/ops_cuda.cpp is the torch binding (checks,
// allocation, streams) built only into a CUDA build of catfast._C.
// Every launcher returns the CUDA error of its launches (cudaSuccess when all went well).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace catfast_cuda {

// Element types of tensors handed to the kernels (one code per tensor, checked by the binding).
enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---- multi-layer LoRA merge / unmerge / swap (merge_lora.cu) -------------------------------------
// One layer: W[out, k] <- round(float(W) + s1 * B1 @ A1 + s2 * B2 @ A2), one rounding per element.
// A1 [r1, k], B1 [out, r1], A2 [r2, k], B2 [out, r2], all contiguous; r2 = 0 disables the second
// term (merge: r2 = 0; unmerge: s1 < 0; swap: the new adapter in term 1, the old one with -s in term 2).
// tile_begin: the first tile index of this layer (filled by the binding, prefix sum of tiles).
struct MergeLayer {
  void* w;
  const void* a1;
  const void* b1;
  const void* a2;
  const void* b2;
  int64_t out;
  int64_t k;
  int64_t tile_begin;
  int32_t r1;
  int32_t r2;
  float s1;
  float s2;
  int32_t w_dtype;
  int32_t ab1_dtype;
  int32_t ab2_dtype;
  int32_t pad_;
};

constexpr int kMergeTileOut = 32;  // rows of W per block
constexpr int kMergeTileK = 64;    // columns of W per block

// Tiles of one layer (the binding sums them into tile_begin and the launch size).
inline int64_t merge_tiles(int64_t out, int64_t k) {
  return ((out + kMergeTileOut - 1) / kMergeTileOut) * ((k + kMergeTileK - 1) / kMergeTileK);
}

// layers: device array of n descriptors; total_tiles: sum of merge_tiles over the layers.
cudaError_t launch_merge_lora(const MergeLayer* layers, int32_t n, int64_t total_tiles, cudaStream_t stream);

// ---- fused GroupNorm + SiLU (groupnorm_silu.cu) ----------------------------------------------------
// x [n, c, hw] contiguous (any trailing spatial dims flattened into hw), groups g divide c.
// Forward: y = silu((x - mean_g) * rstd_g * gamma_c + beta_c); mean, rstd [n, g] fp32 are written for
// backward. gamma / beta may be null (1 / 0). part_mean / part_m2: fp32 scratch [n, c].
cudaError_t launch_group_norm_silu_fwd(const void* x, int32_t x_dtype, const void* gamma, const void* beta,
                                       int32_t affine_dtype, int64_t n, int64_t c, int64_t g, int64_t hw, float eps,
                                       float* part_mean, float* part_m2, void* y, float* mean, float* rstd,
                                       cudaStream_t stream);
// Backward for the samples whose row_mask[i] != 0 (null mask: all): dx (x's dtype, [n, c, hw]; zero in
// the other samples, whose dy is known to be zero), and per (sample, channel) fp32 partial sums
// dgamma_part = sum_hw dz * xhat, dbeta_part = sum_hw dz ([n, c]; zero for masked-out samples), where
// dz = dy * silu'(z). dgamma / dbeta are their sums over samples (the binding does that).
cudaError_t launch_group_norm_silu_bwd(const void* dy, const void* x, int32_t x_dtype, const void* gamma,
                                       const void* beta, int32_t affine_dtype, const float* mean, const float* rstd,
                                       const uint8_t* row_mask, int64_t n, int64_t c, int64_t g, int64_t hw,
                                       float* dgamma_part, float* dbeta_part, void* dx, cudaStream_t stream);

// ---- fused CAT loss (cat_loss.cu) -------------------------------------------------------------------
// pred, target [b, d] (L_LDM) and, when pred_s is not null, pred_s, teacher [b, d] (L_CAT), each its own
// dtype; weights [b] fp32 or null (all 1). Per sample i: ldm_i = mean_d (pred - target)^2, cat_i likewise;
// ldm = mean_i(w_i ldm_i), cat = mean_i(w_i cat_i), total = ldm + cat_weight * cat; out[3] fp32 =
// (total, ldm, cat). Gradients (fp32, [b, d]): g_ldm = d ldm / d pred = 2 w_i (pred - target) / (b d),
// g_cat = d cat / d pred_s likewise. part: fp32 scratch [b, splits, 2].
int32_t cat_loss_splits(int64_t d);
cudaError_t launch_cat_loss(const void* pred, int32_t pred_dtype, const void* target, int32_t target_dtype,
                            const void* pred_s, int32_t pred_s_dtype, const void* teacher, int32_t teacher_dtype,
                            const float* weights, int64_t b, int64_t d, float cat_weight, float* part, float* g_ldm,
                            float* g_cat, float* out, cudaStream_t stream);

}  // namespace catfast_cuda
