// Fused GroupNorm + SiLU on the CPU, forward and a row-aware backward. Semantics:
// catfast/reference/groupnorm_silu.py (the CUDA twin: csrc/cuda/groupnorm_silu.cu).
//   xhat = (x - mean_g) * rstd_g, z = xhat * gamma_c + beta_c, y = z * sigmoid(z)   (fp32 statistics)
// Backward for the samples with row_mask[i] != 0 only (dx is zero for the others, whose dy is zero):
//   dz = dy * sigmoid(z) * (1 + z (1 - sigmoid(z))), dxhat = dz * gamma_c,
//   dx = rstd (dxhat - mean_group(dxhat) - xhat mean_group(dxhat xhat)); dgamma = sum dz xhat, dbeta = sum dz.
// float32 only: with bf16 / fp16 inputs (c10::BFloat16 conversions the compiler keeps scalar) it measured
// 5.6x slower than torch (SD1.5 64x64x320, 1 thread), so catfast.ops.groupnorm_silu runs torch there.
// One parallel task per (sample, group), whose elements are contiguous. exp is a branch-free Cephes-style
// polynomial (about 1 ulp) so that the loops vectorise; target_clones picks AVX-512 / AVX2 at load time.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "checks.h"

// Without this GCC keeps the loops below scalar ("control flow in loop": floor and the clamps may trap).
#pragma GCC optimize("no-trapping-math")

namespace {

inline __attribute__((always_inline)) float exp_poly(float x) {
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -88.3762626647949f ? -88.3762626647949f : x;
  const float fx = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline __attribute__((always_inline)) float sigmoid(float z) { return 1.f / (1.f + exp_poly(-z)); }

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void group_stats(const T* x, int64_t len, float* mean_out,
                                                                              float* var_out) {
  float acc[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= len; j += 16)
    for (int u = 0; u < 16; ++u) acc[u] += static_cast<float>(x[j + u]);
  float s = 0.f;
  for (; j < len; ++j) s += static_cast<float>(x[j]);
  for (int u = 0; u < 16; ++u) s += acc[u];
  const float mean = s / static_cast<float>(len);
  float acc2[16] = {0.f};
  j = 0;
  for (; j + 16 <= len; j += 16)
    for (int u = 0; u < 16; ++u) {
      const float dd = static_cast<float>(x[j + u]) - mean;
      acc2[u] += dd * dd;
    }
  float m2 = 0.f;
  for (; j < len; ++j) {
    const float dd = static_cast<float>(x[j]) - mean;
    m2 += dd * dd;
  }
  for (int u = 0; u < 16; ++u) m2 += acc2[u];
  *mean_out = mean;
  *var_out = m2 / static_cast<float>(len);
}

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void silu_affine(const T* x, T* y, int64_t len,
                                                                              float scale, float shift) {
  for (int64_t j = 0; j < len; ++j) {
    const float z = static_cast<float>(x[j]) * scale + shift;
    y[j] = static_cast<T>(z * sigmoid(z));
  }
}

// sum dz and sum dz * xhat over one channel
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void channel_sums(const T* dy, const T* x, int64_t len,
                                                                               float mu, float rs, float gam,
                                                                               float bet, float* sdz, float* sdzx) {
  float a[16] = {0.f}, b[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= len; j += 16)
    for (int u = 0; u < 16; ++u) {
      const float xh = (static_cast<float>(x[j + u]) - mu) * rs;
      const float z = xh * gam + bet;
      const float sg = sigmoid(z);
      const float dz = static_cast<float>(dy[j + u]) * sg * (1.f + z * (1.f - sg));
      a[u] += dz;
      b[u] += dz * xh;
    }
  float s1 = 0.f, s2 = 0.f;
  for (; j < len; ++j) {
    const float xh = (static_cast<float>(x[j]) - mu) * rs;
    const float z = xh * gam + bet;
    const float sg = sigmoid(z);
    const float dz = static_cast<float>(dy[j]) * sg * (1.f + z * (1.f - sg));
    s1 += dz;
    s2 += dz * xh;
  }
  for (int u = 0; u < 16; ++u) {
    s1 += a[u];
    s2 += b[u];
  }
  *sdz = s1;
  *sdzx = s2;
}

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void channel_dx(const T* dy, const T* x, T* dx,
                                                                             int64_t len, float mu, float rs,
                                                                             float gam, float bet, float m1,
                                                                             float m2) {
  for (int64_t j = 0; j < len; ++j) {
    const float xh = (static_cast<float>(x[j]) - mu) * rs;
    const float z = xh * gam + bet;
    const float sg = sigmoid(z);
    const float dxh = static_cast<float>(dy[j]) * sg * (1.f + z * (1.f - sg)) * gam;
    dx[j] = static_cast<T>(rs * (dxh - m1 - xh * m2));
  }
}

std::vector<int64_t> sizes_of(const at::Tensor& x, int64_t groups) {
  CATFAST_CHECK_CPU(x);
  CATFAST_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 (the CPU version is fp32 only), got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "x must be [N, C, *], got ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(n > 0 && c > 0 && x.numel() > 0, "x must not be empty, got ", x.sizes());
  TORCH_CHECK(groups > 0 && c % groups == 0, "num_groups (", groups, ") must divide the channels of x (", c, ")");
  return {n, c, x.numel() / (n * c)};
}

// gamma / beta as fp32 vectors of c (1 / 0 when absent)
std::vector<float> affine_vec(const std::optional<at::Tensor>& t, int64_t c, float fill, const char* name) {
  std::vector<float> v(static_cast<size_t>(c), fill);
  if (!t.has_value()) return v;
  CATFAST_CHECK_CPU(*t);
  CATFAST_CHECK_FLOATING(*t);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c, name, " must be [", c, "], got ", t->sizes());
  const at::Tensor f = t->to(at::kFloat).contiguous();
  std::copy(f.data_ptr<float>(), f.data_ptr<float>() + c, v.begin());
  return v;
}

}  // namespace

std::vector<at::Tensor> group_norm_silu_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, int64_t num_groups,
                                                double eps) {
  const auto s = sizes_of(x, num_groups);
  const int64_t n = s[0], c = s[1], hw = s[2], cpg = c / num_groups;
  const std::vector<float> gam = affine_vec(weight, c, 1.f, "weight"), bet = affine_vec(bias, c, 0.f, "bias");
  at::Tensor y = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({n, num_groups}, f32), rstd = at::empty({n, num_groups}, f32);
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  {
    using scalar_t = float;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n * num_groups, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t ng = lo; ng < hi; ++ng) {
        const int64_t base = ng * cpg * hw;
        float mu, var;
        group_stats<scalar_t>(xp + base, cpg * hw, &mu, &var);
        const float rs = 1.f / std::sqrt(var + static_cast<float>(eps));
        mp[ng] = mu;
        rp[ng] = rs;
        const int64_t c0 = (ng % num_groups) * cpg;
        for (int64_t j = 0; j < cpg; ++j) {
          const float scale = rs * gam[c0 + j];
          silu_affine<scalar_t>(xp + base + j * hw, yp + base + j * hw, hw, scale, bet[c0 + j] - mu * scale);
        }
      }
    });
  }
  return {y, mean, rstd};
}

std::vector<at::Tensor> group_norm_silu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                const at::Tensor& rstd, const std::optional<at::Tensor>& row_mask,
                                                int64_t num_groups) {
  const auto s = sizes_of(x, num_groups);
  const int64_t n = s[0], c = s[1], hw = s[2], cpg = c / num_groups;
  CATFAST_CHECK_CPU(dy);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(),
              "grad_output must be a contiguous ", x.scalar_type(), " tensor of x's shape ", x.sizes(), ", got ",
              dy.scalar_type(), " ", dy.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    const char* name = t == &mean ? "mean" : "rstd";
    CATFAST_CHECK_CPU(*t);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n * num_groups, name,
                " must be a contiguous float32 [N, num_groups] = [", n, ", ", num_groups, "]");
  }
  const uint8_t* mask = nullptr;
  if (row_mask.has_value()) {
    CATFAST_CHECK_CPU(*row_mask);
    TORCH_CHECK(row_mask->scalar_type() == at::kByte && row_mask->dim() == 1 && row_mask->size(0) == n &&
                    row_mask->is_contiguous(),
                "row_mask must be a contiguous uint8 [N] = [", n, "], got ", row_mask->scalar_type(), " ",
                row_mask->sizes());
    mask = row_mask->data_ptr<uint8_t>();
  }
  const std::vector<float> gam = affine_vec(weight, c, 1.f, "weight"), bet = affine_vec(bias, c, 0.f, "bias");
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  at::Tensor dx = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dg_part = at::zeros({n, c}, f32), db_part = at::zeros({n, c}, f32);
  float* dgp = dg_part.data_ptr<float>();
  float* dbp = db_part.data_ptr<float>();
  {
    using scalar_t = float;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, n * num_groups, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t ng = lo; ng < hi; ++ng) {
        const int64_t i = ng / num_groups, c0 = (ng % num_groups) * cpg, base = ng * cpg * hw;
        if (mask != nullptr && mask[i] == 0) {
          std::fill(dxp + base, dxp + base + cpg * hw, static_cast<scalar_t>(0.f));
          continue;
        }
        const float mu = mp[ng], rs = rp[ng];
        float m1 = 0.f, m2 = 0.f;
        for (int64_t j = 0; j < cpg; ++j) {
          const int64_t ch = c0 + j, off = base + j * hw;
          channel_sums<scalar_t>(dyp + off, xp + off, hw, mu, rs, gam[ch], bet[ch], dbp + i * c + ch,
                                 dgp + i * c + ch);
          m1 += gam[ch] * dbp[i * c + ch];
          m2 += gam[ch] * dgp[i * c + ch];
        }
        const float inv = 1.f / static_cast<float>(cpg * hw);
        for (int64_t j = 0; j < cpg; ++j) {
          const int64_t ch = c0 + j, off = base + j * hw;
          channel_dx<scalar_t>(dyp + off, xp + off, dxp + off, hw, mu, rs, gam[ch], bet[ch], m1 * inv, m2 * inv);
        }
      }
    });
  }
  return {dx, dg_part.sum(0), db_part.sum(0)};
}
