"""The larger load test of `catfast serve` (tests/test_serve_load.py runs a small one in CI): a few hundred
requests, in rounds with the memory recorded after each, from concurrent clients on loopback against the
shipped demo model and adapters, with random cancellations, streams closed early, unknown adapters and bad
sizes (catfast/serve/loadtest.py).

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --rounds 3 --out benchmarks/results/serve-load-cpu-dev-2core.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=150, help="per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 12))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from catfast.serve.loadtest import run_load

    report = run_load(
        args.requests,
        args.clients,
        seed=args.seed,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        steps=tuple(args.steps),
        rounds=args.rounds,
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report.update(
        torch=torch.__version__, torch_threads=torch.get_num_threads(), commit=commit, machine="shared 2-core dev CPU"
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = not report["server_errors"] and not report["unexpected"] and report["final_request_ok"]
    ok = ok and report["after"] == {"queue_depth": 0, "running": 0, "held_entries": []}
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
