"""Triton kernel for the fp8 frozen linear, and its launcher (nothing else lives here).

One kernel serves the forward and the input gradient of ``catfast.ops.fp8.fp8_linear``: a GEMM whose right
operand is a float8 e4m3 weight ``W8 [out, in]`` with one fp32 scale per output channel, dequantized in the
K loop (fp8 tiles loaded, converted, accumulated in fp32), never materialised in full precision:
  forward:  Y  = (X @ W8^T) * scale + bias      (SCALE_K=False: the scale is per column of Y, in the epilogue)
  backward: dX = dY @ (scale[:, None] * W8)     (SCALE_K=True: the scale is per reduction index, on the tile)
Reference: catfast/ops/fp8.py's torch path (``x @ dequantize_fp8(w8, scale).T + bias``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catfast.kernels import launched
from catfast.kernels.lora_gemm import interpreting_bf16
from catfast.kernels.tiles import fit

# Largest tiles (shrunk to small dimensions by ``fit``) and GPU launch options: lora_gemm's default tiles with a
# deeper K pipeline; never tuned on a GPU (the tile table, tiles.json, has no fp8 entry yet)
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
CUDA_OPTIONS = dict(num_warps=4, num_stages=3)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
    SCALE_K: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Y = X @ W' (SCALE_K: W'[k, :] scaled by scale[k]; else Y[:, n] scaled by scale[n]) (+ bias).

    X is [M, K] (fp32/fp16/bf16), W' is [K, N] float8 e4m3 given by strides (W8 or its transpose, free).
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0
        ).to(tl.float32)  # e4m3 -> fp32 is exact
        if SCALE_K:
            w = w * tl.load(scale_ptr + ks, mask=k_ok, other=0.0)[:, None]
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))  # unscaled e4m3 values are exact in fp16 and bf16
    if not SCALE_K:
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def fp8_gemm(
    x: torch.Tensor,  # [M, K] fp32 / fp16 / bf16
    w_kn: torch.Tensor,  # [K, N] float8_e4m3fn (a transposed view is fine)
    scale: torch.Tensor,  # [N] fp32 (scale_k=False) or [K] fp32 (scale_k=True)
    bias: torch.Tensor | None,  # [N]
    *,
    scale_k: bool,
) -> torch.Tensor:
    """``x @ (w_kn * scale[:, None]) + bias`` (scale_k) or ``(x @ w_kn) * scale + bias``: ``[M, N]`` in x's
    dtype, accumulated in fp32, the fp8 weight converted tile by tile."""
    m, k = x.shape
    n = w_kn.shape[1]
    y = torch.empty((m, n), device=x.device, dtype=torch.float32 if interpreting_bf16(x.dtype) else x.dtype)
    bm, bn, bk = fit(BLOCK_M, m), fit(BLOCK_N, n), fit(BLOCK_K, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    options = CUDA_OPTIONS if x.device.type == "cuda" else {}
    with torch.device(x.device):
        launched["fp8_gemm"] += 1
        _fp8_gemm_kernel[grid](
            x, w_kn, scale, bias if bias is not None else scale, y, m, n, k,
            x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), y.stride(0), y.stride(1),
            SCALE_K=scale_k, HAS_BIAS=bias is not None,
            FP32_DOT=x.dtype == torch.float32 or interpreting_bf16(x.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **options,
        )  # fmt: skip
    return y.to(x.dtype)
