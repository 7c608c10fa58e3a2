"""The two algorithms of catfast.ops.conv against each other on the convolutions of the UNets catfast
benchmarks: torch's convolution (oneDNN on the CPU) and im2col + one GEMM, forward and input gradient
timed apart (as the op chooses them), interleaved, medians; FLOP/s of each.

  OMP_NUM_THREADS=1 python benchmarks/conv_algorithms.py \
      --out benchmarks/results/conv-algorithms-cpu-dev-2core.jsonl

Shapes: the 3x3 convolutions of sd15-narrow at batch 3 (the fused step's rows at batch 1) and batch 2
(its input gradients: the grad rows), SD1.5's 8x8 level, and the small UNet's levels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from catfast.ops.conv import MARGIN, conv2d_gemm, conv2d_input_gemm

# (label, batch, C_in, C_out, side)
SHAPES = [
    ("small 64ch 32x32", 3, 64, 64, 32),
    ("small 128ch 16x16", 3, 128, 128, 16),
    ("small 256ch 8x8", 3, 256, 256, 8),
    ("sd15-narrow 320ch 16x16", 3, 320, 320, 16),
    ("sd15-narrow 640ch 8x8", 3, 640, 640, 8),
    ("sd15-narrow 640->1280 4x4", 3, 640, 1280, 4),
    ("sd15-narrow 1280ch 4x4", 3, 1280, 1280, 4),
    ("sd15-narrow 1280ch 4x4, 2 rows", 2, 1280, 1280, 4),
    ("sd15-narrow 2560->1280 4x4", 3, 2560, 1280, 4),
    ("sd15 1280ch 8x8", 3, 1280, 1280, 8),
    ("sd15 1280ch 16x16", 3, 1280, 1280, 16),
]


def _median_ms(fns: dict, rounds: int) -> dict:
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(label: str, n: int, c_in: int, c_out: int, side: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, side, side, generator=g)
    w = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.02
    b = torch.randn(c_out, generator=g)
    dy = torch.randn(n, c_out, side, side, generator=g)
    args = ((1, 1), (1, 1), (1, 1))
    t = _median_ms(
        {
            "forward_native": lambda: F.conv2d(x, w, b, *args),
            "forward_gemm": lambda: conv2d_gemm(x, w, b, *args),
            "input_grad_native": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, *args),
            "input_grad_gemm": lambda: conv2d_input_gemm(x.shape, w, dy, *args),
        },
        rounds,
    )
    flops = 2 * n * side * side * c_in * c_out * 9
    out = {"shape": label, "batch": n, "c_in": c_in, "c_out": c_out, "side": side, "threads": torch.get_num_threads()}
    for k, ms in t.items():
        out[f"{k}_ms"] = round(ms, 3)
        out[f"{k}_gflops"] = round(flops / ms / 1e6, 1)
    for part in ("forward", "input_grad"):
        speedup = t[f"{part}_native"] / t[f"{part}_gemm"]
        out[f"{part}_gemm_speedup"] = round(speedup, 2)
        out[f"{part}_choice"] = "gemm" if speedup >= MARGIN else "native"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON-lines file to append to")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(
        f"| shape ({torch.get_num_threads()} thread(s)) | forward native / gemm ms (GFLOP/s) | x "
        "| dX native / gemm ms (GFLOP/s) | x |"
    )
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        r = measure(*shape, rounds=args.rounds)
        print(
            f"| {r['shape']}, batch {r['batch']} | {r['forward_native_ms']:.2f} / {r['forward_gemm_ms']:.2f} "
            f"({r['forward_native_gflops']:.0f} / {r['forward_gemm_gflops']:.0f}) | {r['forward_gemm_speedup']:.2f} "
            f"| {r['input_grad_native_ms']:.2f} / {r['input_grad_gemm_ms']:.2f} ({r['input_grad_native_gflops']:.0f} / "
            f"{r['input_grad_gemm_gflops']:.0f}) | {r['input_grad_gemm_speedup']:.2f} |",
            flush=True,
        )
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
