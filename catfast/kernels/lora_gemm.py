"""Triton kernels for the row-planned LoRA linear, and their launchers (nothing else lives here).

One kernel serves the forward and the input gradient, because both are a base GEMM plus a rank-r
correction with a per-sample adapter:
  forward:  Y  = X  @ W^T + b + s * (X  @ A^T) @ B^T       (T  = X @ A^T saved for dB)
  backward: dX = dY @ W       + s * (dY @ B)   @ A          (U  = dY @ B kept for dA)
The rank-r product is accumulated in the same K loop as the base GEMM (K extended by r) and added in
the epilogue, so the LoRA costs no extra launch and no extra pass over X. Tiles never straddle two
samples (the grid walks samples x row blocks), so each tile has one adapter slot and one scale.

The adapter-weight gradients are segmented reductions over the rows of each slot:
  dA[s] = sum_{rows of s} (s_m * U_m)^T X_m         dB[s] = sum_{rows of s} (s_m * dY_m)^T T_m
Reference: catfast/reference/lora.py::lora_linear_ref.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from catfast.kernels import launched
from catfast.kernels.tiles import config, fit, launch_options


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, slot_ptr, scale_ptr, y_ptr, t_ptr,
    ROWS_PER_SAMPLE, N, K, R,
    stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_as, stride_ak, stride_ar,
    stride_bs, stride_br, stride_bn,
    stride_ym, stride_yn,
    stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Y[rows of sample n] = X @ W' (+ bias) + scale[n] * (X @ A'[slot[n]]) @ B'[slot[n]].

    W' is [K, N], A' is [S, K, R], B' is [S, R, N] (given by strides, so transposes are free).
    Grid: (num_samples * cdiv(ROWS_PER_SAMPLE, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    blocks_per_sample = tl.cdiv(ROWS_PER_SAMPLE, BLOCK_M)
    sample = pid_m // blocks_per_sample
    local = (pid_m % blocks_per_sample) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < ROWS_PER_SAMPLE
    rows = sample * ROWS_PER_SAMPLE + local
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    slot = tl.load(slot_ptr + sample)
    scale = tl.load(scale_ptr + sample)
    has_lora = slot >= 0
    slot_safe = tl.maximum(slot, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )
        if FP32_DOT:  # the casts are no-ops for fp32 inputs (see FP32_DOT in lora_gemm)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
        if has_lora:
            a = tl.load(
                a_ptr + slot_safe * stride_as + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
                mask=k_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
            if FP32_DOT:
                low += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            else:
                low += tl.dot(x, a)
    if has_lora:
        b = tl.load(
            b_ptr + slot_safe * stride_bs + ranks[:, None] * stride_br + cols[None, :] * stride_bn,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if FP32_DOT:
            acc += tl.dot(low * scale, b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot((low * scale).to(b.dtype), b)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if STORE_T:
        if pid_n == 0:
            tl.store(
                t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
                low,
                mask=row_ok[:, None] & rank_ok[None, :],
            )


@triton.jit
def _segment_outer_kernel(
    l_ptr, r_ptr, row_scale_ptr, seg_ptr, out_ptr,
    P, Q,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_op, stride_oq,
    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """out[s] = sum over rows m in [seg[s], seg[s+1]) of (row_scale[m] * L[m, :])^T R[m, :]   ([P, Q], fp32).
    Grid: (num_segments, cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q))."""
    seg = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    start = tl.load(seg_ptr + seg)
    end = tl.load(seg_ptr + seg + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < end
        lhs = tl.load(
            l_ptr + ms[:, None] * stride_lm + ps[None, :] * stride_lp, mask=m_ok[:, None] & p_ok[None, :], other=0.0
        ).to(tl.float32)
        lhs = lhs * tl.load(row_scale_ptr + ms, mask=m_ok, other=0.0)[:, None]
        rhs = tl.load(
            r_ptr + ms[:, None] * stride_rm + qs[None, :] * stride_rq, mask=m_ok[:, None] & q_ok[None, :], other=0.0
        ).to(tl.float32)
        if FP32_DOT:
            acc += tl.dot(tl.trans(lhs), rhs, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(lhs), rhs)
    tl.store(
        out_ptr + seg * stride_os + ps[:, None] * stride_op + qs[None, :] * stride_oq,
        acc,
        mask=p_ok[:, None] & q_ok[None, :],
    )


def interpreting_bf16(dtype: torch.dtype) -> bool:
    """True for bf16 under TRITON_INTERPRET=1, whose bf16 handling is wrong in triton 3.9 (measured on the
    dev CPU): tl.dot on raw bf16 operands (a 16x16 dot off by 2.5e10; fp16, and bf16 upcast to fp32
    first, were exact) and fp32 -> bf16 casts, which truncate (506 of 1024 values differed from torch's
    round-to-nearest, max error 2x torch's). The launchers then dot in fp32 and store into an fp32 buffer
    that torch rounds; on a GPU bf16 / fp16 dots and stores stay native."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 ("ieee") dots for fp32 inputs, and for bf16 ones in the interpreter (``interpreting_bf16``)."""
    return dtype == torch.float32 or interpreting_bf16(dtype)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _blocks(cfg: dict, m: int, n: int, k: int) -> tuple[int, int, int]:
    """The table's tiles (catfast/kernels/tiles.py) shrunk to small dimensions."""
    return fit(cfg["BLOCK_M"], m), fit(cfg["BLOCK_N"], n), fit(cfg["BLOCK_K"], k)


def lora_gemm(
    x: torch.Tensor,  # [num_samples * rows_per_sample, K]
    w_kn: torch.Tensor,  # [K, N] (a transposed view is fine)
    bias: torch.Tensor | None,  # [N]
    a_skr: torch.Tensor,  # [S, K, R]
    b_srn: torch.Tensor,  # [S, R, N]
    slots: torch.Tensor,  # [num_samples] int64, -1 = no adapter
    scales: torch.Tensor,  # [num_samples] fp32
    rows_per_sample: int,
    *,
    store_low: bool,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Y = X @ W' + bias + scale * (X @ A'[slot]) @ B'[slot] per sample; returns (Y [M, N] in x's dtype,
    T = X @ A'[slot] [M, R] fp32 if ``store_low`` else None; rows without an adapter are left unset in T).
    ``tiles``: a ``lora_gemm`` config (default: the tile table's for x's device)."""
    m, k = x.shape
    n = w_kn.shape[1]
    r = a_skr.shape[2]
    num_samples = slots.numel()
    if m != num_samples * rows_per_sample:
        raise ValueError(f"lora_gemm: {m} rows != {num_samples} samples x {rows_per_sample} rows")
    y = torch.empty((m, n), device=x.device, dtype=torch.float32 if interpreting_bf16(x.dtype) else x.dtype)
    low = torch.zeros((m, r), device=x.device, dtype=torch.float32) if store_low else y
    cfg = tiles or config("lora_gemm", x.device)
    bm, bn, bk = _blocks(cfg, rows_per_sample, n, k)
    grid = (num_samples * triton.cdiv(rows_per_sample, bm), triton.cdiv(n, bn))
    with torch.device(x.device):
        launched["lora_gemm"] += 1
        _lora_gemm_kernel[grid](
            x, w_kn, bias if bias is not None else y, a_skr, b_srn, slots, scales, y, low,
            rows_per_sample, n, k, r,
            x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1),
            a_skr.stride(0), a_skr.stride(1), a_skr.stride(2), b_srn.stride(0), b_srn.stride(1), b_srn.stride(2),
            y.stride(0), y.stride(1), low.stride(0), low.stride(1),
            HAS_BIAS=bias is not None, STORE_T=store_low, FP32_DOT=_fp32_dot(x.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_block_r(r), **launch_options(cfg, x.device),
        )  # fmt: skip
    return y.to(x.dtype), (low if store_low else None)


def segment_outer(
    lhs: torch.Tensor,  # [M, P]
    rhs: torch.Tensor,  # [M, Q]
    row_scale: torch.Tensor,  # [M] fp32
    seg_offsets: torch.Tensor,  # [S + 1] int64, rows of segment s are seg_offsets[s]:seg_offsets[s+1]
    *,
    tiles: dict | None = None,
) -> torch.Tensor:
    """out[s] = (row_scale * lhs)[seg s]^T @ rhs[seg s], ``[S, P, Q]`` fp32 (empty segments give 0).
    ``tiles``: a ``segment_outer`` config (default: the tile table's for lhs's device)."""
    _, p = lhs.shape
    q = rhs.shape[1]
    s = seg_offsets.numel() - 1
    out = torch.empty((s, p, q), device=lhs.device, dtype=torch.float32)
    cfg = tiles or config("segment_outer", lhs.device)
    bp, bq = fit(cfg["BLOCK_P"], p), fit(cfg["BLOCK_Q"], q)
    grid = (s, triton.cdiv(p, bp), triton.cdiv(q, bq))
    with torch.device(lhs.device):
        launched["segment_outer"] += 1
        _segment_outer_kernel[grid](
            lhs, rhs, row_scale, seg_offsets, out, p, q,
            lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out.stride(0), out.stride(1), out.stride(2),
            FP32_DOT=lhs.dtype == torch.float32, BLOCK_M=cfg["BLOCK_M"], BLOCK_P=bp, BLOCK_Q=bq,
            **launch_options(cfg, lhs.device),
        )  # fmt: skip
    return out
