"""Tile tuning (``catfast bench ops --tune``): ``tune_and_write(path, ops=None)`` times candidate
configs of each Triton kernel with ``triton.testing.do_bench`` on SD1.5-sized shapes on the current CUDA
GPU and writes the fastest into the tile table at ``path`` (``catfast/kernels/tiles.py``) under this GPU's
family (other families kept), atomically. It refuses on the CPU: interpreter timings say nothing about a
GPU."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch

from catfast.folders import write_atomic
from catfast.kernels.tiles import BLOCKS, KERNELS, TABLE, TileTableError, check_table, clear_cache, family, read_table

# SD1.5 shapes at 64x64 latents, batch 2: the attention projections (4096 tokens x 320) and the
# mid-block ones (64 tokens x 1280), rank 16; what `catfast bench train-step` spends its LoRA time on
_SHAPES = ((2, 4096, 320, 320, 16), (2, 1024, 640, 640, 16), (2, 64, 1280, 1280, 16))
_CANDIDATES = {
    "lora_gemm": dict(
        BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128), BLOCK_K=(32, 64), num_warps=(4, 8), num_stages=(2, 3)
    ),
    "segment_outer": dict(BLOCK_M=(32, 64, 128), BLOCK_P=(16, 32, 64), BLOCK_Q=(32, 64, 128), num_warps=(4, 8)),
    "segmented_shrink": dict(BLOCK_M=(16, 32, 64), BLOCK_K=(32, 64, 128), num_warps=(2, 4)),
    "segmented_expand": dict(BLOCK_N=(32, 64, 128), num_warps=(4, 8)),
}


def candidates(kernel: str) -> list[dict]:
    """Every config of ``kernel``'s candidate grid."""
    grid = _CANDIDATES[kernel]
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _bench_one(kernel: str, cfg: dict, device, dtype) -> float:
    """Mean ms over ``_SHAPES`` of ``kernel`` run with ``cfg`` (do_bench's median per shape)."""
    import triton.testing

    from catfast.kernels.lora_gemm import lora_gemm, segment_outer  # lazy: triton
    from catfast.kernels.segmented_lora import segmented_lora_triton_  # lazy: triton
    from catfast.ops.segmented import Segment, SegmentPlan

    total = 0.0
    g = torch.Generator(device=device).manual_seed(0)
    for n, tokens, fan_in, fan_out, r in _SHAPES:
        x = torch.randn(n * tokens, fan_in, device=device, dtype=dtype, generator=g)
        w = torch.randn(fan_out, fan_in, device=device, dtype=dtype, generator=g)
        a = torch.randn(2, r, fan_in, device=device, dtype=dtype, generator=g)
        b = torch.randn(2, fan_out, r, device=device, dtype=dtype, generator=g)
        slots = torch.tensor([0, 1] * (n // 2), device=device)
        scales = torch.ones(n, device=device)
        if kernel == "lora_gemm":
            fn = lambda: lora_gemm(x, w.t(), None, a.transpose(1, 2), b.transpose(1, 2), slots, scales, tokens,  # noqa: E731
                                   store_low=True, tiles=cfg)  # fmt: skip
        elif kernel == "segment_outer":
            low = torch.randn(n * tokens, r, device=device, generator=g)
            seg = torch.tensor([0, tokens, n * tokens], device=device)
            row_scale = torch.ones(n * tokens, device=device)
            fn = lambda: segment_outer(x, low, row_scale, seg, tiles=cfg)  # noqa: E731
        else:
            plan = SegmentPlan(n, [Segment(i, i + 1, ((i % 2, 1.0),)) for i in range(n)], device=device)
            y = torch.zeros(n, tokens, fan_out, device=device, dtype=dtype)
            coef = plan.coefficients(torch.ones(2, device=device))
            tiles = {kernel: cfg}
            fn = lambda: segmented_lora_triton_(y, x.view(n, tokens, fan_in), a, b, coef, plan, tiles=tiles)  # noqa: E731
        total += triton.testing.do_bench(fn, warmup=10, rep=40)
    return total / len(_SHAPES)


def tune_and_write(path: str | os.PathLike, ops=None, *, dtype=None, echo=print) -> dict:
    """Time every candidate config of each kernel in ``ops`` (default: all) on the current CUDA GPU and
    write the fastest into the table at ``path`` (created from the shipped table if missing) under this
    GPU's family, atomically; returns the family's entry. Refuses (``TileTableError``) without CUDA."""

    if not torch.cuda.is_available():
        raise TileTableError("tile tuning needs a CUDA GPU (timings of the CPU interpreter say nothing about one)")
    kernels = tuple(ops or KERNELS)
    unknown = [k for k in kernels if k not in BLOCKS]
    if unknown:
        raise TileTableError(f"unknown kernel(s) {unknown}; known: {', '.join(KERNELS)}")
    path = Path(path)
    table = read_table(path if path.exists() else TABLE)
    device = torch.device("cuda")
    fam = family(device)
    entry = dict(table["families"].get(fam, {}))
    for kernel in kernels:
        timed = []
        for cfg in candidates(kernel):
            try:
                timed.append((_bench_one(kernel, cfg, device, dtype or torch.bfloat16), cfg))
            except Exception as e:  # a config that does not fit this GPU (shared memory, registers)
                echo(f"{kernel} {cfg}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        if not timed:
            raise TileTableError(f"no candidate config of {kernel} ran on this GPU")
        ms, best = min(timed, key=lambda t: t[0])
        echo(f"{kernel}: {best} {ms:.3f} ms (mean over {len(_SHAPES)} SD1.5 shapes; {len(timed)} configs ran)")
        entry[kernel] = best
    table["families"][fam] = entry
    write_atomic(path, (json.dumps(check_table(table, str(path)), indent=1, sort_keys=True) + "\n").encode())
    clear_cache()
    return entry
