"""The lifelong comparison of ``catfast demo --compare lifelong`` with every adapter at rank 16 (the demo's
settings otherwise): at rank 16 the star adapter's trigger rows are the concept (docs/retention.md,
"Identity"), so the star's identity after the second concept measures forgetting, not a texture.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/lifelong_rank16.py SEED >> results.jsonl

Prints one JSON line: the ``--json`` summary of ``run_compare(OUT, ["lifelong"])`` plus seed, rank, threads
and the load average before and after.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv=None) -> None:
    import torch

    import catfast.demo.run as run

    run.TRAIN["rank"] = 16  # the same dict catfast.demo.compare trains with
    from catfast.demo.compare import run_compare, summary

    args = argv or sys.argv[1:]
    seed = int(args[0])
    out = args[1] if len(args) > 1 else f"/tmp/catfast-lifelong16-s{seed}"
    load = os.getloadavg()
    result = summary(run_compare(out, ["lifelong"], seed=seed, overwrite=True, progress=False, log=lambda *a: None))
    result.pop("grids", None)
    line = {"seed": seed, "rank": 16, **result, "threads": torch.get_num_threads()}
    line["loadavg_before_after"] = [list(load), list(os.getloadavg())]
    print(json.dumps(line))


if __name__ == "__main__":
    main()
