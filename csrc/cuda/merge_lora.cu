// Multi-layer LoRA merge / unmerge / swap on CUDA, one launch for every layer of the model.
//
// Semantics (catfast/reference/merge.py is the spec): for every layer,
//   W <- round(float(W) + s1 * float(B1) @ float(A1) + s2 * float(B2) @ float(A2))
// accumulated in fp32 and rounded once to W's dtype (fp32 / fp16 / bf16; each layer its own). Merge is
// r2 = 0; unmerge is merge with -s; swap (take adapter 0 out, put adapter 1 in) is both terms in one
// pass over W, so W is read and written once instead of twice and a bf16/fp16 W is rounded once.
//
// Work split: the layers' W are cut into 32 x 64 tiles, numbered consecutively over all layers
// (MergeLayer::tile_begin); block b finds its layer by binary search and computes its tile as a rank-
// chunked outer product through shared memory (the scale folded into the B tile), each of 256 threads
// owning 2 x 4 outputs whose columns are 16 apart so that W loads and stores are coalesced.
#include "common.cuh"

namespace catfast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRankChunk = 32;

__device__ __forceinline__ int find_layer(const MergeLayer* layers, int32_t n, int64_t tile) {
  int lo = 0, hi = n - 1;  // the last layer whose tile_begin <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (layers[mid].tile_begin <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename WT>
__device__ void merge_tile(const MergeLayer& layer, int64_t o0, int64_t k0, float (*a_s)[kMergeTileK],
                           float (*b_s)[kRankChunk + 1]) {
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (int term = 0; term < 2; ++term) {
    const int32_t r = term == 0 ? layer.r1 : layer.r2;
    if (r <= 0) continue;  // uniform over the block: no thread skips a barrier another one reaches
    const void* a = term == 0 ? layer.a1 : layer.a2;
    const void* b = term == 0 ? layer.b1 : layer.b2;
    const int32_t dt = term == 0 ? layer.ab1_dtype : layer.ab2_dtype;
    const float s = term == 0 ? layer.s1 : layer.s2;
    for (int32_t r0 = 0; r0 < r; r0 += kRankChunk) {
      for (int idx = threadIdx.x; idx < kMergeTileOut * kRankChunk; idx += kThreads) {
        const int i = idx / kRankChunk, j = idx % kRankChunk;
        const int64_t o = o0 + i;
        const int32_t rr = r0 + j;
        b_s[i][j] = (o < layer.out && rr < r) ? s * load_any(b, o * r + rr, dt) : 0.f;
      }
      for (int idx = threadIdx.x; idx < kRankChunk * kMergeTileK; idx += kThreads) {
        const int j = idx / kMergeTileK, col = idx % kMergeTileK;
        const int64_t kk = k0 + col;
        const int32_t rr = r0 + j;
        a_s[j][col] = (kk < layer.k && rr < r) ? load_any(a, static_cast<int64_t>(rr) * layer.k + kk, dt) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int j = 0; j < kRankChunk; ++j) {
        const float b0 = b_s[ty][j];
        const float b1 = b_s[ty + 16][j];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float av = a_s[j][tx + 16 * q];
          acc[0][q] = fmaf(b0, av, acc[0][q]);
          acc[1][q] = fmaf(b1, av, acc[1][q]);
        }
      }
      __syncthreads();
    }
  }
  WT* w = static_cast<WT*>(layer.w);
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const int64_t o = o0 + ty + 16 * p;
    if (o >= layer.out) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t kk = k0 + tx + 16 * q;
      if (kk < layer.k) {
        const int64_t i = o * layer.k + kk;
        w[i] = from_float<WT>(to_float(w[i]) + acc[p][q]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) merge_lora_kernel(const MergeLayer* layers, int32_t n) {
  __shared__ float a_s[kRankChunk][kMergeTileK];
  __shared__ float b_s[kMergeTileOut][kRankChunk + 1];  // +1: no bank conflicts on the column loads
  const int64_t tile = blockIdx.x;
  const MergeLayer layer = layers[find_layer(layers, n, tile)];
  const int64_t local = tile - layer.tile_begin;
  const int64_t tiles_k = (layer.k + kMergeTileK - 1) / kMergeTileK;
  const int64_t o0 = (local / tiles_k) * kMergeTileOut;
  const int64_t k0 = (local % tiles_k) * kMergeTileK;
  switch (layer.w_dtype) {  // uniform over the block
    case kF16:
      merge_tile<__half>(layer, o0, k0, a_s, b_s);
      break;
    case kBF16:
      merge_tile<__nv_bfloat16>(layer, o0, k0, a_s, b_s);
      break;
    default:
      merge_tile<float>(layer, o0, k0, a_s, b_s);
  }
}

}  // namespace

cudaError_t launch_merge_lora(const MergeLayer* layers, int32_t n, int64_t total_tiles, cudaStream_t stream) {
  if (n <= 0 || total_tiles <= 0) return cudaSuccess;
  if (total_tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  merge_lora_kernel<<<static_cast<unsigned int>(total_tiles), kThreads, 0, stream>>>(layers, n);
  return cudaGetLastError();
}

}  // namespace catfast_cuda
