// An experiment, not part of catfast: benchmarks/attention_small_heads.py builds it and times it against torch's
// CPU flash attention (benchmarks/README.md, "Attention at head size 8"). Kept to reproduce that figure.
//
// Exact softmax attention on the CPU for small head sizes (AVX-512), forward and backward:
//   out = softmax(scale q k^T) v per (batch, head); lse_i = log sum_j exp(scale q_i . k_j)   (fp32)
// Semantics: torch.nn.functional.scaled_dot_product_attention (no mask, no dropout). q (B, H, S, D), k and v (B, H, L, D), any strides with the
// last one 1 (diffusers' (B, S, H, D) views are read in place); out, dq, dk and dv are written in
// (B, N, H, D) memory and returned as (B, H, N, D) views, so the caller's transpose back is free.
//
// Why: at head sizes 8 and 16 (the small UNets' heads) attention is bound by the softmax, not by GEMMs:
// torch's CPU flash attention runs each block as small-K GEMMs, then passes over the score tile for the
// max, the exps and P V. Here keys and values are transposed once per (batch, head) to (D, L), so every
// step is a 16-wide FMA over key positions and one pass over the keys does scores, exps and P V for a
// row without storing the scores. The pass subtracts a bound on the row's max score instead of the max
// itself (scale |q_i| max_j |k_j|, Cauchy-Schwarz): softmax does not depend on the subtracted value, and
// exp keeps its relative precision while the bound is within kMaxGap of the true max; a row that is
// further off (scores of very different sizes) is redone with its true max.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>


#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CATFAST_X86 1
#endif

namespace {

constexpr int64_t kW = 16;     // floats per vector
constexpr float kMaxGap = 60.f;  // exp(-60) ~ 1e-26: the bound may exceed the true max by this much

int64_t padded(int64_t n) { return (n + kW - 1) / kW * kW; }

// Strided (B, H, N, D) tensor with a unit last stride: pointer to row (b, h, i).
struct Rows {
  float* data;
  int64_t sb, sh, si;
  explicit Rows(const at::Tensor& t) : data(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), si(t.stride(2)) {}
  float* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * si; }
};

// dst (D, Lp) with row stride ld = rows 0..L-1 of (b, h) transposed, zero in columns L..Lp-1; returns
// max_j |row j|. ld = Lp + 16: with Lp a multiple of 1024 the D rows of a key block 4 KB apart fell into
// the same L1 sets and evicted each other (the backward of a (3, 8, 1024, 8) attention ran 2x slower).
float transpose_padded(const Rows& src, int64_t b, int64_t h, int64_t L, int64_t D, int64_t Lp, int64_t ld, float* dst) {
  float max_sq = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    const float* s = src.row(b, h, j);
    float sq = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      dst[d * ld + j] = s[d];
      sq += s[d] * s[d];
    }
    max_sq = std::max(max_sq, sq);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = L; j < Lp; ++j) dst[d * ld + j] = 0.f;
  return std::sqrt(max_sq);
}

#ifdef CATFAST_X86
#define CATFAST_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// exp(x) for x <= 0 up to rounding (a score minus a bound on it, or minus its row's log-sum-exp): Cephes
// expf's range reduction and polynomial (about 1 ulp), 2^n applied with scalef; x < -87 gives ~1e-38.
CATFAST_AVX512 __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

CATFAST_AVX512 __mmask16 valid_lanes(int64_t c, int64_t L) {
  return c + kW <= L ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (L - c)) - 1u);
}

// Keys are visited in blocks of kKeyBlock / D columns, so that a block of kt and vt (and, in backward, of
// dkt and dvt) stays in L1 while every row of the task passes over it: a row that streams all of (D, L)
// from L2 for itself ran at L2 bandwidth (the forward of a (3, 8, 1024, 8) self-attention 22.6 ms without
// blocking). The forward can split the keys because the subtracted value is a fixed bound: the per-row
// sums of the blocks just add, no rescaling.
constexpr int64_t kKeyBlock = 2048;

template <int D>
constexpr int64_t key_block() {
  return kKeyBlock / D;  // D = 8: 256 keys, 2 x 8 KB of kt and vt
}

// Running sums of one query row over key blocks: acc[d] (sum_j p_j v_j[d], 16 lanes), sum_j p_j, max score.
template <int D>
struct alignas(64) RowState {
  float acc[D][kW];
  float sum[kW];
  float mx[kW];
};

// Adds keys [c0, c1) of one query row to its state: p_j = exp(scale q . k_j - shift).
template <int D>
__attribute__((target("avx512f"))) void softmax_row_keys(const float* qs, const float* kt, const float* vt,
                                                         int64_t c0, int64_t c1, int64_t L, int64_t ld, float shift,
                                                         RowState<D>* st) {
  __m512 acc[D];
  for (int d = 0; d < D; ++d) acc[d] = _mm512_load_ps(st->acc[d]);
  __m512 sum = _mm512_load_ps(st->sum), mx = _mm512_load_ps(st->mx);
  const __m512 sh = _mm512_set1_ps(shift);
  for (int64_t c = c0; c < c1; c += kW) {
    const __mmask16 lanes = valid_lanes(c, L);
    __m512 s = _mm512_mul_ps(_mm512_set1_ps(qs[0]), _mm512_load_ps(kt + c));
    for (int d = 1; d < D; ++d) s = _mm512_fmadd_ps(_mm512_set1_ps(qs[d]), _mm512_load_ps(kt + d * ld + c), s);
    mx = _mm512_mask_max_ps(mx, lanes, mx, s);
    const __m512 p = _mm512_maskz_mov_ps(lanes, exp_nonpositive(_mm512_sub_ps(s, sh)));
    sum = _mm512_add_ps(sum, p);
    for (int d = 0; d < D; ++d) acc[d] = _mm512_fmadd_ps(p, _mm512_load_ps(vt + d * ld + c), acc[d]);
  }
  for (int d = 0; d < D; ++d) _mm512_store_ps(st->acc[d], acc[d]);
  _mm512_store_ps(st->sum, sum);
  _mm512_store_ps(st->mx, mx);
}

template <int D>
__attribute__((target("avx512f"))) void reset(RowState<D>* st) {
  for (int d = 0; d < D; ++d) _mm512_store_ps(st->acc[d], _mm512_setzero_ps());
  _mm512_store_ps(st->sum, _mm512_setzero_ps());
  _mm512_store_ps(st->mx, _mm512_set1_ps(-INFINITY));
}

// Output rows i0..i1-1 of one (b, h); states holds i1 - i0 RowStates, qs (i1 - i0) x D scratch.
template <int D>
__attribute__((target("avx512f"))) void forward_rows(const Rows& q, const Rows& out, float* lse, const float* kt,
                                                     const float* vt, float k_norm, int64_t b, int64_t h,
                                                     int64_t i0, int64_t i1, int64_t L, int64_t Lp, int64_t ld, float scale,
                                                     RowState<D>* states, float* qs, float* bounds) {
  const int64_t n = i1 - i0;
  for (int64_t r = 0; r < n; ++r) {
    const float* qi = q.row(b, h, i0 + r);
    float q_sq = 0.f;
    for (int d = 0; d < D; ++d) {
      qs[r * D + d] = qi[d] * scale;
      q_sq += qi[d] * qi[d];
    }
    bounds[r] = std::fabs(scale) * std::sqrt(q_sq) * k_norm;
    reset<D>(states + r);
  }
  for (int64_t c0 = 0; c0 < Lp; c0 += key_block<D>()) {
    const int64_t c1 = std::min(Lp, c0 + key_block<D>());
    for (int64_t r = 0; r < n; ++r) softmax_row_keys<D>(qs + r * D, kt, vt, c0, c1, L, ld, bounds[r], states + r);
  }
  for (int64_t r = 0; r < n; ++r) {
    RowState<D>* st = states + r;
    float shift = bounds[r];
    float total = _mm512_reduce_add_ps(_mm512_load_ps(st->sum));
    const float row_max = _mm512_reduce_max_ps(_mm512_load_ps(st->mx));
    if (!(shift - row_max <= kMaxGap) || !(total > 0.f)) {  // also catches NaN / inf inputs
      shift = row_max;
      reset<D>(st);
      softmax_row_keys<D>(qs + r * D, kt, vt, 0, Lp, L, ld, shift, st);
      total = _mm512_reduce_add_ps(_mm512_load_ps(st->sum));
    }
    float* o = out.row(b, h, i0 + r);
    for (int d = 0; d < D; ++d) o[d] = _mm512_reduce_add_ps(_mm512_load_ps(st->acc[d])) / total;
    lse[i0 + r] = shift + std::log(total);
  }
}

// Gradients of one (b, h), key block by key block: dq rows accumulated, dk and dv rows written.
//   p = exp(scale q k^T - lse), dS = p (dO v^T - delta), dq = scale dS k, dk = scale dS^T q, dv = p^T dO
template <int D>
__attribute__((target("avx512f"))) void backward_head(const Rows& q, const Rows& dout, const Rows& dq,
                                                      const Rows& dk, const Rows& dv, const float* lse,
                                                      const float* delta, const float* kt, const float* vt, int64_t b,
                                                      int64_t h, int64_t S, int64_t L, int64_t Lp, int64_t ld, float scale,
                                                      float* dkt, float* dvt) {
  for (int64_t c0 = 0; c0 < Lp; c0 += key_block<D>()) {
    const int64_t c1 = std::min(Lp, c0 + key_block<D>());
    for (int d = 0; d < D; ++d)
      for (int64_t c = c0; c < c1; ++c) dkt[d * ld + c] = dvt[d * ld + c] = 0.f;
    for (int64_t i = 0; i < S; ++i) {
      const float* qi = q.row(b, h, i);
      const float* gi = dout.row(b, h, i);
      float qs[D];
      for (int d = 0; d < D; ++d) qs[d] = qi[d] * scale;
      __m512 gdq[D];
      for (int d = 0; d < D; ++d) gdq[d] = _mm512_setzero_ps();
      const __m512 l = _mm512_set1_ps(lse[i]), dl = _mm512_set1_ps(delta[i]);
      for (int64_t c = c0; c < c1; c += kW) {
        const __mmask16 lanes = valid_lanes(c, L);
        __m512 s = _mm512_setzero_ps(), dp = _mm512_setzero_ps();
        for (int d = 0; d < D; ++d) {
          s = _mm512_fmadd_ps(_mm512_set1_ps(qs[d]), _mm512_load_ps(kt + d * ld + c), s);
          dp = _mm512_fmadd_ps(_mm512_set1_ps(gi[d]), _mm512_load_ps(vt + d * ld + c), dp);
        }
        const __m512 p = _mm512_maskz_mov_ps(lanes, exp_nonpositive(_mm512_sub_ps(s, l)));
        const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(dp, dl));
        for (int d = 0; d < D; ++d) {
          gdq[d] = _mm512_fmadd_ps(ds, _mm512_load_ps(kt + d * ld + c), gdq[d]);
          float* gk = dkt + d * ld + c;
          float* gv = dvt + d * ld + c;
          _mm512_store_ps(gk, _mm512_fmadd_ps(_mm512_set1_ps(qs[d]), ds, _mm512_load_ps(gk)));  // scale q ds
          _mm512_store_ps(gv, _mm512_fmadd_ps(_mm512_set1_ps(gi[d]), p, _mm512_load_ps(gv)));
        }
      }
      float* gq = dq.row(b, h, i);
      for (int d = 0; d < D; ++d) {
        const float part = scale * _mm512_reduce_add_ps(gdq[d]);
        gq[d] = c0 == 0 ? part : gq[d] + part;
      }
    }
    for (int64_t j = c0; j < std::min(L, c1); ++j) {
      float* gk = dk.row(b, h, j);
      float* gv = dv.row(b, h, j);
      for (int d = 0; d < D; ++d) {
        gk[d] = dkt[d * ld + j];
        gv[d] = dvt[d * ld + j];
      }
    }
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#else
bool cpu_has_avx512() { return false; }
#endif

// Head sizes with a compiled kernel; each is a template instance (the accumulators live in registers).
bool head_size_supported(int64_t D) { return D == 8 || D == 16; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(cpu_has_avx512(), "attention_cpu needs a CPU with AVX-512 (attention_cpu_supported says so)");
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "q, k and v must be CPU tensors");
    TORCH_CHECK(t->dim() == 4, "q, k and v must be (batch, heads, tokens, head size), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "attention_cpu takes float32 q, k and v, got ", t->scalar_type());
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), "q ", q.sizes(),
              " and k ", k.sizes(), " must agree in batch, heads and head size");
  TORCH_CHECK(head_size_supported(q.size(3)), "attention_cpu has kernels for head sizes 8 and 16, got ", q.size(3));
  TORCH_CHECK(k.size(2) > 0, "attention needs at least one key");
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A (B, H, N, D) tensor whose memory is (B, N, H, D), as diffusers lays out heads.
at::Tensor empty_heads_last(const at::Tensor& like, int64_t n) {
  return at::empty({like.size(0), n, like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// Aligned float scratch of n elements for one parallel task.
struct Scratch {
  at::Tensor t;
  explicit Scratch(int64_t n) : t(at::empty({n}, at::kFloat)) {}
  float* get() { return t.data_ptr<float>(); }
};

}  // namespace

bool attention_cpu_supported(int64_t head_size) { return cpu_has_avx512() && head_size_supported(head_size); }

std::vector<at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                          double scale) {
  check_inputs(q_in, k_in, v_in);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), L = k.size(2), Lp = padded(L), ld = Lp + kW;
  at::Tensor out = empty_heads_last(q, S);
  at::Tensor lse = at::empty({B, H, S}, q.options());
#ifdef CATFAST_X86
  const Rows qr(q), kr(k), vr(v), outr(out);
  float* lse_p = lse.data_ptr<float>();
  constexpr int64_t kRowsPerTask = 64;  // a task: one (b, h) and up to 64 query rows
  const int64_t tasks_per_head = (S + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, B * H * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    Scratch kt(D * ld), vt(D * ld), states(kRowsPerTask * (D + 2) * kW), qs(kRowsPerTask * D), bounds(kRowsPerTask);
    int64_t loaded = -1;
    float k_norm = 0.f;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / tasks_per_head, b = bh / H, h = bh % H;
      if (bh != loaded) {  // keys and values are transposed once per (b, h) and thread
        k_norm = transpose_padded(kr, b, h, L, D, Lp, ld, kt.get());
        transpose_padded(vr, b, h, L, D, Lp, ld, vt.get());
        loaded = bh;
      }
      const int64_t i0 = (task % tasks_per_head) * kRowsPerTask, i1 = std::min(S, i0 + kRowsPerTask);
      const float sc = static_cast<float>(scale);
      if (D == 8)
        forward_rows<8>(qr, outr, lse_p + bh * S, kt.get(), vt.get(), k_norm, b, h, i0, i1, L, Lp, ld, sc,
                        reinterpret_cast<RowState<8>*>(states.get()), qs.get(), bounds.get());
      else
        forward_rows<16>(qr, outr, lse_p + bh * S, kt.get(), vt.get(), k_norm, b, h, i0, i1, L, Lp, ld, sc,
                         reinterpret_cast<RowState<16>*>(states.get()), qs.get(), bounds.get());
    }
  });
#endif
  return {out, lse};
}

std::vector<at::Tensor> attention_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
                                          double scale) {
  check_inputs(q_in, k_in, v_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out.sizes() == q_in.sizes(), "grad_out and out must have q's shape ",
              q_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "grad_out and out must be float32");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q_in.size(0), q_in.size(1), q_in.size(2)}),
              "lse must be the contiguous float32 (batch, heads, tokens) tensor of attention_fwd_cpu");
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor dout = unit_last_stride(dout_in);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), L = k.size(2), Lp = padded(L), ld = Lp + kW;
  const at::Tensor delta = (dout * out).sum(-1).contiguous();  // delta_i = sum_d dO_i,d O_i,d
  at::Tensor dq = empty_heads_last(q, S), dk = empty_heads_last(k, L), dv = empty_heads_last(v, L);
#ifdef CATFAST_X86
  const Rows qr(q), kr(k), vr(v), dor(dout), dqr(dq), dkr(dk), dvr(dv);
  const float* lse_p = lse.data_ptr<float>();
  const float* delta_p = delta.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Scratch kt(D * ld), vt(D * ld), dkt(D * ld), dvt(D * ld);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      transpose_padded(kr, b, h, L, D, Lp, ld, kt.get());
      transpose_padded(vr, b, h, L, D, Lp, ld, vt.get());
      const auto f = D == 8 ? backward_head<8> : backward_head<16>;
      f(qr, dor, dqr, dkr, dvr, lse_p + bh * S, delta_p + bh * S, kt.get(), vt.get(), b, h, S, L, Lp, ld,
        static_cast<float>(scale), dkt.get(), dvt.get());
    }
  });
#endif
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &attention_cpu_supported, "whether this CPU and head size have a kernel");
  m.def("forward", &attention_fwd_cpu, "(out, lse)");
  m.def("backward", &attention_bwd_cpu, "(dq, dk, dv)");
}
