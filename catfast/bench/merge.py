"""Merge a rank-r LoRA into every attention projection of an SD1.5-shaped UNet (to_q/to_k/to_v/to_out.0 of
all 32 attention modules) and unmerge it again, on the CPU (``benchmarks/bench_merge.py`` runs it).

Providers, timed interleaved in one process (median of ``reps`` merge+unmerge round trips, after one
warm-up round):
  ext       catfast._C merge_lora_: one call for all layers, fp32 accumulate, one rounding
  reference catfast.reference.merge_lora_ref_: per-layer torch, fp32 accumulate
  naive     per-layer ``W += s * (B @ A)`` in the weight dtype (what a plain torch user writes)
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from catfast._ext import EXT
from catfast.bench.measure import git_commit
from catfast.errors import CatfastError
from catfast.integrations.factory import attention_weight_shapes
from catfast.reference.merge import merge_lora_ref_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive_merge_(weights, downs, ups, scales) -> None:
    """``W += s * (B @ A)`` per layer, in the weight dtype."""
    for w, a, b, s in zip(weights, downs, ups, scales):
        w += s * (b.to(w.dtype) @ a.to(w.dtype))


def bench_merge(*, rank: int = 16, dtype: str = "fp32", reps: int = 7, model: str = "sd15") -> dict:
    """Median ms of one merge (half a merge+unmerge round trip) per provider, and the ext's speedups."""
    if EXT is None:
        raise CatfastError("catfast._C is not built; see `python -m catfast.env`")
    torch_dtype = DTYPES[dtype]
    shapes = attention_weight_shapes(model)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g).to(torch_dtype) for s in shapes]
    downs = [torch.randn(rank, s[1], generator=g).to(torch_dtype) * 0.01 for s in shapes]
    ups = [torch.randn(s[0], rank, generator=g).to(torch_dtype) * 0.01 for s in shapes]
    scales = [0.5] * len(shapes)
    providers = {
        "ext": lambda sc: EXT.merge_lora_(weights, downs, ups, sc),
        "reference": lambda sc: merge_lora_ref_(weights, downs, ups, sc),
        "naive": lambda sc: naive_merge_(weights, downs, ups, sc),
    }
    times: dict[str, list[float]] = {name: [] for name in providers}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, run in providers.items():
            t0 = time.perf_counter()
            run(scales)
            run([-s for s in scales])
            if rep:
                times[name].append((time.perf_counter() - t0) / 2 * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "bench": "merge",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": dtype,
        "rank": rank,
        "layers": len(shapes),
        "weight_params": sum(a * b for a, b in shapes),
        "median_ms": {name: round(ms, 2) for name, ms in medians.items()},
        "torch": torch.__version__,
        "git": git_commit() or "",
    }
    result["speedup_vs_reference"] = round(medians["reference"] / medians["ext"], 2)
    result["speedup_vs_naive"] = round(medians["naive"] / medians["ext"], 2)
    return result
