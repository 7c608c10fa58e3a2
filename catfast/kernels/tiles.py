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

``catfast.bench.tiles.tune_and_write`` (``catfast bench ops --tune``) writes a new table on the GPU it
runs on.
"""

from __future__ import annotations

import functools
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


def check_table(table: dict, where: str) -> dict:
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
    return check_table(table, str(path))


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


def clear_cache() -> None:
    """Forget the configs read so far (after the table at a path was rewritten)."""
    _cached.cache_clear()
