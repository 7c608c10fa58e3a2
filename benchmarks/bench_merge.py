"""Merge a rank-r LoRA into every attention projection of an SD1.5-shaped UNet (to_q/to_k/to_v/
to_out.0 of all 32 attention modules) and unmerge it again, on the CPU.

Providers, timed interleaved in one process (median of --reps merge+unmerge round trips):
  ext       catfast._C merge_lora_: one call for all layers, fp32 accumulate, one rounding
  reference catfast.reference.merge_lora_ref_: per-layer torch, fp32 accumulate
  naive     per-layer `W += s * (B @ A)` in the weight dtype (what a plain torch user writes)

  python benchmarks/bench_merge.py --rank 16 --dtype bf16 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from catfast._ext import EXT
from catfast.integrations.factory import unet_config
from catfast.reference.merge import merge_lora_ref_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_weight_shapes() -> list[tuple[int, int]]:
    """[out, in] of every to_q/to_k/to_v/to_out.0 Linear in the SD1.5 UNet (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15"))
    suffixes = (".to_q", ".to_k", ".to_v", ".to_out.0")
    return [tuple(m.weight.shape) for n, m in unet.named_modules() if n.endswith(suffixes)]


def naive_merge_(weights, downs, ups, scales):
    for w, a, b, s in zip(weights, downs, ups, scales):
        w += s * (b.to(w.dtype) @ a.to(w.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if EXT is None:
        raise SystemExit("catfast._C is not built; see `python -m catfast.env`")

    dtype = DTYPES[args.dtype]
    shapes = attention_weight_shapes()
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    downs = [torch.randn(args.rank, s[1], generator=g).to(dtype) * 0.01 for s in shapes]
    ups = [torch.randn(s[0], args.rank, generator=g).to(dtype) * 0.01 for s in shapes]
    scales = [0.5] * len(shapes)
    providers = {
        "ext": lambda sc: EXT.merge_lora_(weights, downs, ups, sc),
        "reference": lambda sc: merge_lora_ref_(weights, downs, ups, sc),
        "naive": lambda sc: naive_merge_(weights, downs, ups, sc),
    }
    times: dict[str, list[float]] = {name: [] for name in providers}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, run in providers.items():
            t0 = time.perf_counter()
            run(scales)
            run([-s for s in scales])
            if rep:
                times[name].append((time.perf_counter() - t0) / 2 * 1e3)
    params = sum(a * b for a, b in shapes)
    result = {
        "bench": "merge",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "rank": args.rank,
        "layers": len(shapes),
        "weight_params": params,
        "median_ms": {name: round(statistics.median(t), 2) for name, t in times.items()},
        "torch": torch.__version__,
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    result["speedup_vs_reference"] = round(result["median_ms"]["reference"] / result["median_ms"]["ext"], 2)
    result["speedup_vs_naive"] = round(result["median_ms"]["naive"] / result["median_ms"]["ext"], 2)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"merge of {len(shapes)} SD1.5 attention layers ({params / 1e6:.1f}M weights), rank {args.rank}, {args.dtype}"
    )
    for name, ms in result["median_ms"].items():
        print(f"  {name:<10} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
