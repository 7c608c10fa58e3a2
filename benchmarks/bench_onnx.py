"""UNet latency in ONNX Runtime vs PyTorch with the same merged weights, for several models, into one file.

Each model runs `catfast.bench.onnx.bench_onnx` (the code behind `catfast bench onnx`): both exports
(merged, adapter inputs) validated, then torch and every usable ORT provider timed interleaved.

  python benchmarks/bench_onnx.py --models tiny small --reps 30 --out benchmarks/results/onnx-cpu-dev-2core.json
"""

from __future__ import annotations

import argparse
import json

from catfast.bench.onnx import bench_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "sd15"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", help="Write the results (a JSON list, one object per model) here.")
    args = parser.parse_args()
    results = [bench_onnx(m, reps=args.reps, batch=args.batch, rank=args.rank) for m in args.models]
    text = json.dumps(results, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
