"""The published `catfast bench train-step` grid, one command: every entry (catfast's modes and the
official / ai-toolkit / kohya contestants) on the small UNet (batch 1 and 2) and the SD1.5-width
``sd15-narrow`` UNet (batch 1), at 1 and 2 threads, fp32 and bf16 autocast. Each configuration runs in
its own process (`catfast bench train-step --json`, thread count set by OMP_NUM_THREADS) and appends one
JSON line to --out.

  python benchmarks/bench_train_step.py --out benchmarks/results/train-step-cpu-dev-2core.jsonl
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

GRID = [  # (model, batch, threads, mixed precision, timed steps), 1 thread first
    cfg
    for t in (1, 2)
    for cfg in [("small", b, t, p, 5) for p in ("no", "bf16") for b in (1, 2)]
    + [("sd15-narrow", 1, t, p, 3) for p in ("no", "bf16")]
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--models", default="small,sd15-narrow", help="comma-separated subset of the grid's models")
    ap.add_argument("--threads", default="1,2", help="comma-separated subset of the grid's thread counts")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N configurations (resume a run)")
    args = ap.parse_args()
    models, threads = args.models.split(","), [int(t) for t in args.threads.split(",")]
    for model, batch, nthreads, precision, steps in GRID[args.skip :]:
        if model not in models or nthreads not in threads:
            continue
        cmd = [sys.executable, "-m", "catfast.cli", "bench", "train-step", "--model", model, "--batch", str(batch)]
        cmd += ["--steps", str(steps), "--mixed-precision", precision, "--json"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(nthreads)})
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        line = r.stdout.strip().splitlines()[-1]
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(f"{model} batch {batch} {nthreads} threads {precision}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
