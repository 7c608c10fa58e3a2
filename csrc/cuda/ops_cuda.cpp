// The torch binding of catfast's CUDA kernels (csrc/cuda/*.cu): argument checks that name the
// argument, allocation, device guard and stream; the kernels themselves are torch-free (kernels.h).
// Built into catfast._C only by a CUDA build (setup.py defines CATFAST_WITH_CUDA); CI syntax-checks it
// against the CPU wheel's headers (csrc/check_cuda_compile.sh).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <vector>

#include "kernels.h"
#include "ops.h"

namespace {


int32_t dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return catfast_cuda::kF32;
    case at::kHalf:
      return catfast_cuda::kF16;
    case at::kBFloat16:
      return catfast_cuda::kBF16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return catfast_cuda::kF32;
}

void check_on(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the other tensors are on ", device);
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

// A layer's A and B as contiguous [r, k] / [out, r] tensors of one dtype (kept alive by the caller).
struct Term {
  at::Tensor a;
  at::Tensor b;
  int32_t rank = 0;
  float scale = 0.f;
  int32_t dtype = catfast_cuda::kF32;
};

Term make_term(int64_t i, const char* which, const at::Tensor& w, const at::Tensor& down, const at::Tensor& up,
               double scale) {
  check_on(down, w.device(), which);
  check_on(up, w.device(), which);
  dtype_code(down, "down");
  dtype_code(up, "up");
  TORCH_CHECK(down.dim() >= 2 && up.dim() >= 2, "layer ", i, ": ", which, " down and up must have at least 2 dims");
  const int64_t out = w.size(0), k = w.numel() / out, rank = down.size(0);
  TORCH_CHECK(up.size(0) == out && up.numel() == out * rank, "layer ", i, ": ", which, " up ", up.sizes(),
              " must be [out, r(,1,1)] = [", out, ", ", rank, "] for weight ", w.sizes());
  TORCH_CHECK(down.numel() == rank * k, "layer ", i, ": ", which, " down ", down.sizes(), " does not match weight ",
              w.sizes());
  TORCH_CHECK(rank <= 0x7fffffffLL, "layer ", i, ": rank too large");
  Term t;
  const at::ScalarType st = down.scalar_type() == up.scalar_type() ? down.scalar_type() : at::kFloat;
  t.a = down.to(st).reshape({rank, k}).contiguous();
  t.b = up.to(st).reshape({out, rank}).contiguous();
  t.rank = static_cast<int32_t>(rank);
  t.scale = static_cast<float>(scale);
  t.dtype = dtype_code(t.a, "down");
  return t;
}

}  // namespace

void merge_lora_cuda_(std::vector<at::Tensor> weights, std::vector<at::Tensor> downs, std::vector<at::Tensor> ups,
                      std::vector<double> scales, std::vector<at::Tensor> downs2, std::vector<at::Tensor> ups2,
                      std::vector<double> scales2) {
  const size_t n = weights.size();
  TORCH_CHECK(downs.size() == n && ups.size() == n && scales.size() == n,
              "merge_lora_: weights, downs, ups and scales must have the same length, got ", n, ", ", downs.size(),
              ", ", ups.size(), ", ", scales.size());
  const bool two = !downs2.empty() || !ups2.empty() || !scales2.empty();
  TORCH_CHECK(!two || (downs2.size() == n && ups2.size() == n && scales2.size() == n),
              "swap_lora_: the second adapter's downs, ups and scales must have one entry per weight (", n, ")");
  if (n == 0) return;
  const at::Device device = weights[0].device();
  TORCH_CHECK(weights[0].is_cuda(), "weights[0] must be a CUDA tensor, got one on ", device);
  std::vector<Term> keep;
  keep.reserve(2 * n);
  std::vector<catfast_cuda::MergeLayer> layers(n);
  int64_t tiles = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    check_on(w, device, "weight");
    TORCH_CHECK(w.is_contiguous(), "layer ", i, ": weight must be contiguous");
    TORCH_CHECK(w.dim() >= 2, "layer ", i, ": weight must have at least 2 dims, got ", w.sizes());
    TORCH_CHECK(w.numel() > 0, "layer ", i, ": weight must not be empty, got ", w.sizes());
    catfast_cuda::MergeLayer& l = layers[i];
    std::memset(&l, 0, sizeof(l));
    l.w = w.data_ptr();
    l.w_dtype = dtype_code(w, "weight");
    l.out = w.size(0);
    l.k = w.numel() / l.out;
    keep.push_back(make_term(static_cast<int64_t>(i), "adapter", w, downs[i], ups[i], scales[i]));
    const Term& t1 = keep.back();
    l.a1 = t1.a.data_ptr();
    l.b1 = t1.b.data_ptr();
    l.r1 = t1.rank;
    l.s1 = t1.scale;
    l.ab1_dtype = t1.dtype;
    if (two) {
      keep.push_back(make_term(static_cast<int64_t>(i), "second adapter", w, downs2[i], ups2[i], scales2[i]));
      const Term& t2 = keep.back();
      l.a2 = t2.a.data_ptr();
      l.b2 = t2.b.data_ptr();
      l.r2 = t2.rank;
      l.s2 = t2.scale;
      l.ab2_dtype = t2.dtype;
    }
    l.tile_begin = tiles;
    tiles += catfast_cuda::merge_tiles(l.out, l.k);
  }
  const c10::cuda::CUDAGuard guard(device);
  const int64_t bytes = static_cast<int64_t>(n * sizeof(catfast_cuda::MergeLayer));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), layers.data(), static_cast<size_t>(bytes));
  at::Tensor dev = host.to(device, /*non_blocking=*/true);  // the pinned buffer lives until the copy is done
  check_cuda(catfast_cuda::launch_merge_lora(static_cast<const catfast_cuda::MergeLayer*>(dev.data_ptr()),
                                             static_cast<int32_t>(n), tiles, c10::cuda::getCurrentCUDAStream()),
             "merge_lora_");
}

namespace {

// [n, c, hw] sizes of a GroupNorm input, checked.
std::vector<int64_t> gn_sizes(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "x must be [N, C, *], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(n > 0 && c > 0 && x.numel() > 0, "x must not be empty, got ", x.sizes());
  TORCH_CHECK(groups > 0 && c % groups == 0, "num_groups (", groups, ") must divide the channels of x (", c, ")");
  return {n, c, x.numel() / (n * c)};
}

int32_t affine_code(const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta, const at::Tensor& x,
                    int64_t c) {
  int32_t code = catfast_cuda::kF32;
  bool first = true;
  for (const auto* p : {&gamma, &beta}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = p->value();
    const char* name = p == &gamma ? "weight" : "bias";
    check_on(t, x.device(), name);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == c && t.is_contiguous(), name, " must be a contiguous [", c, "], got ",
                t.sizes());
    const int32_t dt = dtype_code(t, name);
    TORCH_CHECK(first || dt == code, "weight and bias must have the same dtype");
    code = dt;
    first = false;
  }
  return code;
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

}  // namespace

std::vector<at::Tensor> group_norm_silu_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, int64_t num_groups,
                                                 double eps) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  const int32_t xd = dtype_code(x, "x");
  const auto s = gn_sizes(x, num_groups);
  const int32_t ad = affine_code(weight, bias, x, s[1]);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor part_mean = at::empty({s[0], s[1]}, f32), part_m2 = at::empty({s[0], s[1]}, f32);
  at::Tensor y = at::empty_like(x), mean = at::empty({s[0], num_groups}, f32), rstd = at::empty({s[0], num_groups}, f32);
  check_cuda(catfast_cuda::launch_group_norm_silu_fwd(
                 x.data_ptr(), xd, ptr_or_null(weight), ptr_or_null(bias), ad, s[0], s[1], num_groups, s[2],
                 static_cast<float>(eps), part_mean.data_ptr<float>(), part_m2.data_ptr<float>(), y.data_ptr(),
                 mean.data_ptr<float>(), rstd.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "group_norm_silu forward");
  return {y, mean, rstd};
}

std::vector<at::Tensor> group_norm_silu_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                 const at::Tensor& rstd, const std::optional<at::Tensor>& row_mask,
                                                 int64_t num_groups) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  const int32_t xd = dtype_code(x, "x");
  const auto s = gn_sizes(x, num_groups);
  check_on(dy, x.device(), "grad_output");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(),
              "grad_output must be a contiguous ", x.scalar_type(), " tensor of x's shape ", x.sizes(), ", got ",
              dy.scalar_type(), " ", dy.sizes());
  for (const auto* t : {&mean, &rstd}) {
    const char* name = t == &mean ? "mean" : "rstd";
    check_on(*t, x.device(), name);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == s[0] * num_groups, name,
                " must be a contiguous float32 [N, num_groups] = [", s[0], ", ", num_groups, "]");
  }
  const uint8_t* mask = nullptr;
  if (row_mask.has_value()) {
    check_on(*row_mask, x.device(), "row_mask");
    TORCH_CHECK(row_mask->scalar_type() == at::kByte && row_mask->dim() == 1 && row_mask->size(0) == s[0] &&
                    row_mask->is_contiguous(),
                "row_mask must be a contiguous uint8 [N] = [", s[0], "], got ", row_mask->scalar_type(), " ",
                row_mask->sizes());
    mask = row_mask->data_ptr<uint8_t>();
  }
  const int32_t ad = affine_code(weight, bias, x, s[1]);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dgamma_part = at::empty({s[0], s[1]}, f32), dbeta_part = at::empty({s[0], s[1]}, f32);
  at::Tensor dx = at::empty_like(x);
  check_cuda(catfast_cuda::launch_group_norm_silu_bwd(dy.data_ptr(), x.data_ptr(), xd, ptr_or_null(weight),
                                                      ptr_or_null(bias), ad, mean.data_ptr<float>(),
                                                      rstd.data_ptr<float>(), mask, s[0], s[1], num_groups, s[2],
                                                      dgamma_part.data_ptr<float>(), dbeta_part.data_ptr<float>(),
                                                      dx.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "group_norm_silu backward");
  return {dx, dgamma_part.sum(0), dbeta_part.sum(0)};
}

std::vector<at::Tensor> cat_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                      const std::optional<at::Tensor>& pred_stripped,
                                      const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& weights,
                                      double cat_weight) {
  TORCH_CHECK(pred.is_cuda(), "pred must be a CUDA tensor, got one on ", pred.device());
  TORCH_CHECK(pred.dim() >= 1 && pred.numel() > 0, "pred must be a non-empty [B, ...] tensor, got ", pred.sizes());
  TORCH_CHECK(pred_stripped.has_value() == teacher.has_value(), "pred_stripped and teacher come together");
  const int64_t b = pred.size(0), d = pred.numel() / b;
  auto check_pred = [&](const at::Tensor& t, const char* name) {
    check_on(t, pred.device(), name);
    TORCH_CHECK(t.sizes() == pred.sizes(), name, " ", t.sizes(), " must have pred's shape ", pred.sizes());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    return dtype_code(t, name);
  };
  const int32_t pd = check_pred(pred, "pred"), td = check_pred(target, "target");
  int32_t sd = catfast_cuda::kF32, ed = catfast_cuda::kF32;
  if (pred_stripped.has_value()) {
    sd = check_pred(*pred_stripped, "pred_stripped");
    ed = check_pred(*teacher, "teacher");
  }
  const float* w = nullptr;
  if (weights.has_value()) {
    check_on(*weights, pred.device(), "weights");
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->dim() == 1 && weights->size(0) == b &&
                    weights->is_contiguous(),
                "weights must be a contiguous float32 [B] = [", b, "], got ", weights->scalar_type(), " ",
                weights->sizes());
    w = weights->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor part = at::empty({b * catfast_cuda::cat_loss_splits(d) * 2}, f32);
  at::Tensor g_ldm = at::empty(pred.sizes(), f32);
  at::Tensor g_cat = pred_stripped.has_value() ? at::empty(pred.sizes(), f32) : at::Tensor();
  at::Tensor out = at::empty({3}, f32);
  check_cuda(catfast_cuda::launch_cat_loss(
                 pred.data_ptr(), pd, target.data_ptr(), td, ptr_or_null(pred_stripped), sd, ptr_or_null(teacher), ed,
                 w, b, d, static_cast<float>(cat_weight), part.data_ptr<float>(), g_ldm.data_ptr<float>(),
                 g_cat.defined() ? g_cat.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                 c10::cuda::getCurrentCUDAStream()),
             "cat_loss");
  return {out, g_ldm, g_cat};
}
