"""Merge a rank-r LoRA into every attention projection of an SD1.5-shaped UNet and unmerge it again, on
the CPU: the C++ extension against torch, interleaved in one process (``catfast.bench.merge`` says how).

  python benchmarks/bench_merge.py --rank 16 --dtype bf16 --json
"""

from __future__ import annotations

import argparse
import json

from catfast.bench.merge import DTYPES, bench_merge
from catfast.errors import CatfastError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        result = bench_merge(rank=args.rank, dtype=args.dtype, reps=args.reps)
    except CatfastError as e:
        raise SystemExit(str(e)) from None
    if args.json:
        print(json.dumps(result))
        return
    params, layers = result["weight_params"], result["layers"]
    print(f"merge of {layers} SD1.5 attention layers ({params / 1e6:.1f}M weights), rank {args.rank}, {args.dtype}")
    for name, ms in result["median_ms"].items():
        print(f"  {name:<10} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
