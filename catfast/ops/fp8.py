"""Frozen weights stored as float8 e4m3 with one scale per output channel (``--base-dtype fp8``), and the
linear that computes with them.

Quantization of ``W [out, in]``: ``scale[o] = max_i |W[o, i]| / 448`` (448: e4m3fn's largest finite value; a
zero row gets scale 1), ``W8 = round_e4m3(W / scale[:, None])``; ``dequantize_fp8`` gives ``W8 * scale[:, None]``.
Rounding bound per element (e4m3: 3 mantissa bits, exponents down to 2^-6, subnormal spacing 2^-9):
``|W - dequant(W8)| <= max(2^-4 |W|, 2^-10 scale)`` (half a spacing: relative 2^-4 for normal values,
absolute 2^-10 in units of the scale below 2^-6), plus fp32 rounding of the division and product.

``fp8_linear(x, w8, scale, bias)`` is ``x @ dequant(W8).T + bias`` with input gradient
``dX = dY @ dequant(W8)``; no weight gradient (a frozen base). Backends (``catfast.backends``):
- ``triton`` (CUDA, sm_89 and newer: Triton's e4m3 conversion): ``kernels/fp8_gemm.py``, the dequantization
  fused into the GEMM's K loop, the scale in the epilogue;
- ``torch`` (everywhere): ``x @ dequant(W8).T + b`` and ``dX = dY @ dequant(W8)``, dequantized in x's dtype;
  the full-precision copy of W8 is a temporary of one GEMM (one layer's weight at a time), freed after it.
Autograd saves W8 and the scale only (no activation: there is no dW).
"""

from __future__ import annotations

import torch

from catfast.backends import choose, register, torch_probe, triton_probe
from catfast.errors import CatfastError

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# the e4m3 rounding bound (module docstring): relative for normal values, absolute (x scale) for subnormal ones
REL_ROUNDING = 2.0**-4
SUBNORMAL_ROUNDING = 2.0**-10


def require_fp8() -> None:
    """Raise a one-line CatfastError where this torch has no float8 e4m3 dtype (torch < 2.1)."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise CatfastError(
            f"--base-dtype fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks; "
            "upgrade torch (2.1 or newer) or leave --base-dtype auto"
        )


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w8 [out, in] float8_e4m3fn, scale [out] fp32)`` of ``weight [out, in]`` (any float dtype), on its
    device: ``scale = amax(|row|) / 448`` (1 for an all-zero row), ``w8 = weight / scale`` rounded to e4m3
    (clamped to +-448 so that fp32 rounding of the division cannot overflow to NaN)."""
    require_fp8()
    if weight.dim() != 2:
        raise ValueError(f"quantize_fp8 takes a [out, in] weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w8 = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, scale


# Rows dequantized at a time on the CPU, in elements: a 12288 x 3072 weight (FLUX.1's feed-forward) to bf16 took
# 0.17 s in chunks of 2^18 elements against 0.31 s in one piece, whose fp32 temporaries (2 x 151 MB) also set
# the step's peak RSS (1 thread, dev CPU); CUDA converts the whole weight in one launch per op
_CPU_CHUNK = 2**18


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w8 * scale[:, None]`` as ``[out, in]`` of ``dtype`` (computed in fp32, rounded once)."""
    scale = scale.float()
    if w8.device.type == "cuda" or w8.numel() <= _CPU_CHUNK:
        return (w8.float() * scale[:, None]).to(dtype)
    out = torch.empty(w8.shape, dtype=dtype, device=w8.device)
    rows = max(1, _CPU_CHUNK // max(w8.shape[1], 1))
    for start in range(0, w8.shape[0], rows):
        out[start : start + rows] = w8[start : start + rows].float().mul_(scale[start : start + rows, None])
    return out


def rounding_bound(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 rounding bound of each element of ``weight [out, in]`` quantized with ``scale [out]`` (fp32)."""
    w = weight.detach().float().abs()
    return torch.maximum(REL_ROUNDING * w, SUBNORMAL_ROUNDING * scale.float()[:, None])


def _triton_fp8_probe(device, dtype=None) -> str | None:
    """``triton_probe``, and on CUDA a compute capability of 8.9 or more (Triton converts e4m3 there)."""
    why = triton_probe(device, dtype)
    if why is None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"sm_{major}{minor}: Triton's float8 e4m3 needs sm_89 or newer"
    return why


register("fp8_linear", "frozen linear with a float8 e4m3 weight and per-channel scales (dX only)",
         triton=_triton_fp8_probe, torch=torch_probe)  # fmt: skip


def fp8_linear(
    x: torch.Tensor,  # [..., in]
    w8: torch.Tensor,  # [out, in] float8_e4m3fn
    scale: torch.Tensor,  # [out] fp32
    bias: torch.Tensor | None = None,  # [out]
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ dequantize_fp8(w8, scale).T + bias`` as ``[..., out]`` in x's dtype; differentiable in ``x`` only
    (module docstring). ``backend``: ``triton`` or ``torch`` (default: ``CATFAST_BACKEND`` or the automatic
    choice: triton on CUDA where it can run)."""
    if w8.dtype != torch.float8_e4m3fn or w8.dim() != 2 or scale.shape != (w8.shape[0],):
        raise ValueError(f"fp8_linear takes w8 [out, in] float8_e4m3fn and scale [out], got {w8.dtype} "
                         f"{tuple(w8.shape)} and {tuple(scale.shape)}")  # fmt: skip
    if x.shape[-1] != w8.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, the weight takes {w8.shape[1]}")
    if bias is not None and bias.requires_grad:
        raise ValueError("fp8_linear is a frozen layer: its bias must not require grad")
    chosen = choose("fp8_linear", x.device, x.dtype, requested=backend)
    bias = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    flat = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and x.requires_grad:
        y = _Fp8LinearFunction.apply(flat, w8, scale, bias, chosen)
    else:
        y = _forward(flat, w8, scale, bias, chosen)
    return y.view(*x.shape[:-1], w8.shape[0])


def _forward(x, w8, scale, bias, backend: str) -> torch.Tensor:
    if backend == "triton":
        from catfast.kernels.fp8_gemm import fp8_gemm  # lazy: triton

        return fp8_gemm(x, w8.t(), scale, bias, scale_k=False)
    # dequantized first, as the nn.Linear it replaces computes: (x @ W8^T) * scale rounds the output twice in
    # bf16 (max error 25.3 against F.linear's 6.7 on tests/test_fp8.py's [38, 53] x [37, 53], seed 0: 1.5 ulp
    # against 0.5), with the scale in fp32 too; the [out, in] copy is this GEMM's temporary
    return torch.nn.functional.linear(x, dequantize_fp8(w8, scale, x.dtype), bias)


def _input_grad(dy, w8, scale, backend: str) -> torch.Tensor:
    if backend == "triton":
        from catfast.kernels.fp8_gemm import fp8_gemm  # lazy: triton

        return fp8_gemm(dy, w8, scale, None, scale_k=True)
    return dy @ dequantize_fp8(w8, scale, dy.dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    """Y = X dequant(W8)^T + b; dX = dY dequant(W8). Saves W8 and the scale (no activation)."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias, backend):
        ctx.save_for_backward(w8, scale)
        ctx.backend = backend
        return _forward(x, w8, scale, bias, backend)

    @staticmethod
    def backward(ctx, dy):
        w8, scale = ctx.saved_tensors
        return _input_grad(dy.contiguous(), w8, scale, ctx.backend), None, None, None, None
