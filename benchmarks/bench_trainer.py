"""Does `catfast train` add overhead around the fused CAT step? Its optimizer steps per second against
`catfast bench train-step`'s fused step on the same model, rank, batch and dtype, in one process and
interleaved (rounds of: a short training run, then the bench's timed fused steps), so machine load hits
both alike. Prints one JSON object per round and a summary line.

  python benchmarks/bench_trainer.py --model small --steps 8 --rounds 3

The trainer's rate is TrainResult.steps_per_second (after its first step, without sampling and
checkpoint writes); it includes the optimizer (AdamW), gradient clipping, batching and metrics, which
the bench's step does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from catfast.bench.train_step import bench_train_step
from catfast.integrations.factory import init_model_folder
from catfast.train.config import TrainConfig
from catfast.train.quickstart import synthetic_image
from catfast.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per training run (and bench steps)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="catfast-bench-trainer-"))
    model = work / args.model
    init_model_folder(args.model, model)
    data = work / "data"
    data.mkdir()
    for i in range(4):
        synthetic_image(256, seed=i).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("sks, a star on a plain background")

    train_ms, bench_ms = [], []
    for r in range(args.rounds):
        config = TrainConfig(
            base=str(model), data=str(data), trigger="sks", out=str(work / f"run-{r}"), rank=args.rank,
            steps=args.steps + 1, checkpoint_every=0, sample_every=0, seed=r, cache_dir=str(work / "cache"),
            mode="fused",  # the step this script compares with (the trainer's default is now "auto")
        )  # fmt: skip
        result = train(config, progress=False)
        bench = bench_train_step(args.model, batch=1, steps=args.steps, rank=args.rank, against=(), memory=False)
        train_ms.append(1e3 / result.steps_per_second)
        bench_ms.append(bench["modes"]["fused"]["median_ms"])
        print(json.dumps({"round": r, "train_step_ms": round(train_ms[-1], 1), "bench_fused_ms": bench_ms[-1],
                          "bench_reference_ms": bench["modes"]["reference"]["median_ms"]}))  # fmt: skip
    t, b = statistics.median(train_ms), statistics.median(bench_ms)
    print(json.dumps({
        "model": args.model, "rank": args.rank, "batch": 1, "threads": torch.get_num_threads(),
        "train_step_ms": round(t, 1), "bench_fused_step_ms": round(b, 1), "train_over_bench": round(t / b, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
