"""The eager host-time floor of any one-call CAT step on ``sd15-skeleton``: one plain peft UNet call over the 2B
adapter rows, forward and backward (no teacher rows, nothing of catfast), against the official three-call step,
interleaved in one process. If this floor is above half the official step's host time, no eager one-call step
can reach half of it: the difference is diffusers' per-module Python, which only capture (torch.compile, CUDA
graphs) removes.

    OMP_NUM_THREADS=1 CATFAST_CONV=native python benchmarks/host_floor.py --out benchmarks/results/host-floor.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from catfast.bench.launches import count_step
from catfast.bench.measure import cpu_name, git_commit
from catfast.bench.train_step import _loss_fns, _setup, _step
from catfast.train.objective import _predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15-skeleton")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    a = ap.parse_args()
    unet, sched, batch, teacher = _setup(a.model, 1, 4, torch.float32, "cpu", 0)
    fns = _loss_fns(["official"], unet, sched, batch, teacher)
    noisy = torch.cat([batch["latents"]] * 2)
    steps = torch.cat([batch["timesteps"]] * 2)
    cond = torch.cat([batch["cond"], batch["cond_stripped"]])

    def floor():
        unet.zero_grad(set_to_none=True)
        _predict(unet, noisy, steps, cond).float().square().mean().backward()

    entries = {"official": lambda: _step(unet, fns["official"][0], contextlib.nullcontext), "floor": floor}
    times = {name: [] for name in entries}
    for i in range(a.steps + 1):
        for name, fn in entries.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "bench": "host_floor",
        "model": a.model,
        "threads": torch.get_num_threads(),
        "conv": os.environ.get("CATFAST_CONV", "auto"),
        "steps": a.steps,
        "median_ms": {k: round(v, 2) for k, v in ms.items()},
        "launch_ops": {name: count_step(fn).launch_ops for name, fn in entries.items()},
        "floor_vs_official": round(ms["floor"] / ms["official"], 3),
        "cpu": cpu_name(),
        "load_before": os.getloadavg()[0],
        "git": git_commit(),
    }
    print(json.dumps(result))
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
