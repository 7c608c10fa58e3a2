"""Triton kernels for the segmented mixed-adapter LoRA of serving (shrink and expand), and their launcher.

Token rows are grouped into contiguous segments (one per adapter mix, laid out on the host); a tile of
BLOCK_M token rows never straddles two segments, so each program reads its segment's (slot, coef)
pairs once and needs no gather or scatter:
  shrink:  T[m, k*R:(k+1)*R] = coef[g, k] * X[m] @ A[slot[g, k]]^T          for every pair k of segment g
  expand:  Y[m] += T[m] @ concat_k(B[slot[g, k]])^T                          (in place, base output)
Rows outside every segment (base-only rows) are never touched. Accumulation in fp32.
Reference: catfast/reference/segmented.py::segmented_lora_linear_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catfast.kernels import launched
from catfast.kernels.lora_gemm import interpreting_bf16
from catfast.kernels.tiles import config, fit, launch_options


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, t_ptr, tile_seg_ptr, tile_row_ptr, seg_stop_ptr, slot_ptr, coef_ptr,
    IN, R, KMAX,
    stride_xm, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_tm, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """T rows of one tile for every (slot, coef) pair of its segment. Grid: (tiles,)."""
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    stop = tl.load(seg_stop_ptr + seg)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < stop
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    for k in range(0, KMAX):
        slot = tl.load(slot_ptr + seg * KMAX + k)
        coef = tl.load(coef_ptr + seg * KMAX + k)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < IN
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            a = tl.load(a_ptr + slot * stride_as + ranks[None, :] * stride_ar + ks[:, None] * stride_ak,
                        mask=rank_ok[None, :] & k_ok[:, None], other=0.0)  # fmt: skip
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        acc = acc * coef
        t_ptrs = t_ptr + rows[:, None] * stride_tm + (k * R + ranks)[None, :] * stride_tr
        tl.store(t_ptrs, acc, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, y_ptr, tile_seg_ptr, tile_row_ptr, seg_stop_ptr, slot_ptr,
    OUT, R, KMAX,
    stride_tm, stride_tr,
    stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Y[tile rows, column block] += T @ concat_k(B[slot_k])^T. Grid: (tiles, cdiv(OUT, BLOCK_N))."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    stop = tl.load(seg_stop_ptr + seg)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < stop
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < OUT
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, KMAX):
        slot = tl.load(slot_ptr + seg * KMAX + k)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + ranks
            r_ok = rs < R
            t = tl.load(t_ptr + rows[:, None] * stride_tm + (k * R + rs)[None, :] * stride_tr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
            b = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + rs[:, None] * stride_br,
                        mask=col_ok[None, :] & r_ok[:, None], other=0.0)  # fmt: skip
            acc += tl.dot(t, b.to(tl.float32), input_precision="ieee")
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _tiles(plan, tokens: int, block_m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile -> segment, tile -> first token row, segment -> stop token row), made once per plan."""
    key = ("triton_tiles", tokens, block_m)
    cache = plan.__dict__.setdefault("_cache", {})
    hit = cache.get(key)
    if hit is None:
        segs, rows, stops = [], [], []
        for g, s in enumerate(plan.segments):
            start, stop = s.start * tokens, s.stop * tokens
            stops.append(stop)
            for r in range(start, stop, block_m):
                segs.append(g)
                rows.append(r)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
        hit = cache[key] = (as_tensor(segs), as_tensor(rows), as_tensor(stops))
    return hit


def plan_tiles(plan, x: torch.Tensor, tiles: dict | None = None):
    """``(tile_seg, tile_row, seg_stop, block_m)``: the plan flattened to the launch's tensors (made once
    per plan and token count; ``tiles`` as in ``segmented_lora_triton_``)."""
    shrink = (tiles or {}).get("segmented_shrink") or config("segmented_shrink", x.device)
    tokens = x.numel() // max(x.shape[0] * x.shape[-1], 1)  # (no reshape: it would copy a strided x)
    return (*_tiles(plan, tokens, shrink["BLOCK_M"], x.device), shrink["BLOCK_M"])


def segmented_lora_triton_(y, x, lora_a, lora_b, coef, plan, *, tiles: dict | None = None) -> torch.Tensor:
    """``catfast.ops.segmented.segmented_lora_linear_`` on the Triton kernels (coef: ``[G, K]`` already
    times the layer's per-slot scales). x ``[N, ..., in]``, y ``[N, ..., out]`` contiguous. ``tiles``:
    ``{"segmented_shrink": cfg, "segmented_expand": cfg}`` (either may be missing: the tile table's)."""
    if not y.is_contiguous():
        raise ValueError("the Triton segmented LoRA adds into a contiguous output")
    segmented_launch_(y, x, lora_a, lora_b, coef, plan.slots, *plan_tiles(plan, x, tiles), tiles=tiles)
    return y


def segmented_launch_(y, x, lora_a, lora_b, coef, slots, tile_seg, tile_row, seg_stop, block_m: int, *,
                      tiles: dict | None = None) -> None:  # fmt: skip
    """The two launches on a plan flattened to tensors: ``slots`` / ``coef`` ``[G, K]`` (int32 / float),
    ``tile_seg`` / ``tile_row`` one entry per tile of ``block_m`` token rows (its segment and first row),
    ``seg_stop`` the stop token row of each segment. Adds into ``y`` in place."""
    tiles = tiles or {}
    shrink = tiles.get("segmented_shrink") or config("segmented_shrink", x.device)
    expand = tiles.get("segmented_expand") or config("segmented_expand", x.device)
    fan_in, out = x.shape[-1], y.shape[-1]
    x2 = x.reshape(-1, fan_in)
    y2 = y.view(-1, out)
    if interpreting_bf16(y.dtype):  # the interpreter truncates fp32 -> bf16 stores: torch rounds instead
        y2 = y2.float()
    r, kmax = lora_a.shape[1], slots.shape[1]
    slots = slots.to(torch.int32).contiguous()
    coef = coef.float().contiguous()
    t = torch.empty((x2.shape[0], kmax * r), dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(r))
    block_k = fit(shrink["BLOCK_K"], fan_in)
    grid = (tile_seg.numel(),)
    launched["shrink"] += 1
    _shrink_kernel[grid](
        x2, lora_a, t, tile_seg, tile_row, seg_stop, slots, coef,
        fan_in, r, kmax,
        x2.stride(0), x2.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        t.stride(0), t.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, **launch_options(shrink, x.device),
    )  # fmt: skip
    block_n = fit(expand["BLOCK_N"], out)
    launched["expand"] += 1
    _expand_kernel[(tile_seg.numel(), triton.cdiv(out, block_n))](
        t, lora_b, y2, tile_seg, tile_row, seg_stop, slots,
        out, r, kmax,
        t.stride(0), t.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y2.stride(0), y2.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, **launch_options(expand, x.device),
    )  # fmt: skip
    if y2.dtype != y.dtype:
        y.view(-1, out).copy_(y2)
