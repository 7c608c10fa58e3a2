"""Triton tile sizes per kernel and GPU family, from a JSON table (``tiles.json`` next to this file).

The table maps a family (``"sm_90"``: the CUDA compute capability; ``"default"`` for every other GPU
and the CPU interpreter) to one config per kernel::

    {"version": 1, "families": {"default": {"lora_gemm": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32,
                                                          "num_warps": 4, "num_stages": 2}, ...}}}

The BLOCK_* values are the largest tiles a launcher uses: it shrinks a block to the next power of two
of a small dimension (>= 16, what ``tl.dot`` needs), so tiny shapes (and the interpreter) stay cheap.
``num_warps`` / ``num_stages`` are launch options (ignored by the interpreter). A family missing a
kernel falls back to ``default``'s entry. The shipped ``default`` entries are the tiles the kernels had
before this table (correct everywhere, never tuned on a GPU). ``CATFAST_TILES=/path/table.json``
reads another table.

``tune_and_write(path, ops=None)`` times candidate configs of each kernel with
``triton.testing.do_bench`` on SD1.5-sized shapes on the current CUDA GPU and writes the fastest into
``path`` under this GPU's family (other families kept), atomically. It refuses on the CPU: interpreter
timings say nothing about a GPU.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path

from catfast.errors import CatfastError

TABLE = Path(__file__).with_name("tiles.json")
KERNELS = ("lora_gemm", "segment_outer", "segmented_shrink", "segmented_expand")
# the block parameters each kernel's config must have (plus optional num_warps / num_stages)
BLOCKS = {
    "lora_gemm": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "segment_outer": ("BLOCK_M", "BLOCK_P", "BLOCK_Q"),
    "segmented_shrink": ("BLOCK_M", "BLOCK_K"),
    "segmented_expand": ("BLOCK_N",),
}
_LAUNCH = ("num_warps", "num_stages")


class TileTableError(CatfastError):
    """The tile table is unreadable or malformed, or tuning was asked for where it cannot run."""


def family(device=None) -> str:
    """The GPU family key of ``device`` (``sm_<major><minor>``), or ``"default"`` off CUDA."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return "default"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _check_table(table: dict, where: str) -> dict:
    if not isinstance(table, dict) or not isinstance(table.get("families"), dict):
        raise TileTableError(f"{where}: a tile table is {{'version': 1, 'families': {{family: {{kernel: config}}}}}}")
    if "default" not in table["families"]:
        raise TileTableError(f"{where}: the table has no 'default' family")
    for fam, kernels in table["families"].items():
        for kernel, cfg in kernels.items():
            if kernel not in BLOCKS:
                raise TileTableError(f"{where}: family {fam}: unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")
            missing = [k for k in BLOCKS[kernel] if k not in cfg]
            bad = [k for k, v in cfg.items() if k not in BLOCKS[kernel] + _LAUNCH or not isinstance(v, int) or v < 1]
            pow2 = [k for k in BLOCKS[kernel] if k in cfg and isinstance(cfg[k], int) and cfg[k] & (cfg[k] - 1)]
            if missing or bad or pow2:
                raise TileTableError(
                    f"{where}: family {fam}, kernel {kernel}: missing {missing}, bad keys/values {bad}, "
                    f"not powers of two {pow2}"
                )
    for kernel in KERNELS:
        if kernel not in table["families"]["default"]:
            raise TileTableError(f"{where}: the 'default' family has no {kernel} config")
    return table


def read_table(path: str | os.PathLike | None = None) -> dict:
    """The table at ``path`` (default ``CATFAST_TILES`` or the shipped ``tiles.json``), checked."""
    path = Path(path or os.environ.get("CATFAST_TILES") or TABLE)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TileTableError(f"{path}: cannot read the tile table: {e}") from None
    return _check_table(table, str(path))


@functools.cache
def _cached(path: str, fam: str, kernel: str) -> tuple[tuple[str, int], ...]:
    fams = read_table(path)["families"]
    return tuple(fams.get(fam, {}).get(kernel, fams["default"][kernel]).items())


def config(kernel: str, device=None) -> dict:
    """The config of ``kernel`` for ``device``'s family (falling back to ``default``), read once per
    table path, family and kernel."""
    if kernel not in BLOCKS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    path = str(os.environ.get("CATFAST_TILES") or TABLE)
    return dict(_cached(path, family(device), kernel))


def launch_options(cfg: dict, device) -> dict:
    """``num_warps`` / ``num_stages`` of ``cfg`` on CUDA (the CPU interpreter takes none)."""
    import torch

    if torch.device(device).type != "cuda":
        return {}
    return {k: cfg[k] for k in _LAUNCH if k in cfg}


def fit(block: int, size: int, floor: int = 16) -> int:
    """``block`` shrunk to the next power of two of ``size`` (at least ``floor``, what tl.dot needs)."""
    import triton

    return min(block, max(floor, triton.next_power_of_2(max(int(size), 1))))


# -- tuning (CUDA only) ---------------------------------------------------------------------------------

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
    import torch
    import triton.testing

    from catfast.kernels.lora_gemm import lora_gemm, segment_outer
    from catfast.kernels.segmented_lora import segmented_lora_triton_
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
    import torch

    from catfast.folders import write_atomic

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
    write_atomic(path, (json.dumps(_check_table(table, str(path)), indent=1, sort_keys=True) + "\n").encode())
    _cached.cache_clear()
    return entry
