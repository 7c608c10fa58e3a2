"""The retention comparison (issue 14) over training seeds: mean ± sample standard deviation per method,
from the lines of ``benchmarks/results/retention-cpu-dev-2core.jsonl`` (one ``catfast demo --compare
cat,cat-guidance,bank,lifelong --json`` summary per training seed, with ``seed`` and ``per_prompt``).

    python benchmarks/retention_table.py benchmarks/results/retention-cpu-dev-2core.jsonl

Prints the markdown tables of docs/retention.md.
"""

from __future__ import annotations

import json
import statistics
import sys

SINGLE = ("plain", "cat", "cat-guidance", "bank")
KEYS = ("preservation", "colour_preservation", "red_star", "identity", "diversity", "kps", "step_seconds")
LIFELONG = ("identity", "identity_new", "preservation_star", "preservation_ball", "preservation", "step_seconds")


def ms(values: list[float], digits: int = 3) -> str:
    """ "mean ± sd" (sample standard deviation; 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def tables(runs: list[dict]) -> str:
    """The per-method table, the lifelong table and the per-seed wins, as markdown."""
    for run in runs:
        for name in SINGLE:
            run[name]["red_star"] = run["per_prompt"][name]["a red star"]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    out = [
        f"Training seeds {seeds} (n = {len(runs)}); mean ± sample standard deviation over seeds.",
        "",
        '| method | preservation | colour prompts | "a red star" | identity | diversity | KPS | s/step |',
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in SINGLE:
        cells = [ms([r[name][k] for r in runs], 3 if k != "step_seconds" else 3) for k in KEYS]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append(f"| base model | | | | | {ms([r['base']['diversity'] for r in runs])} | | |")
    out += [
        "",
        "| second concept B (base + star adapter A + B) | star identity after B | ball identity | "
        "star prompts preservation | ball prompts preservation | preservation (mean) | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    out.append(
        f"| A alone (CAT star adapter, before B) | {ms([r['cat']['identity'] for r in runs])} | | "
        f"{ms([r['cat']['preservation'] for r in runs])} | | | |"
    )
    for variant in ("plain", "cat", "keep"):
        rows = [r["lifelong"]["variants"][variant] for r in runs]
        out.append(f"| B {variant} | " + " | ".join(ms([x[k] for x in rows]) for k in LIFELONG) + " |")
    out += ["", "Per seed, the method's number against CAT's (higher is better):", ""]
    for name in ("cat-guidance", "bank"):
        for key in ("preservation", "colour_preservation", "identity", "kps"):
            wins = sum(r[name][key] > r["cat"][key] for r in runs)
            out.append(f"- {name} {key}: higher than CAT in {wins} of {len(runs)} seeds")
    for key in ("identity", "preservation"):
        wins = sum(r["lifelong"]["variants"]["keep"][key] > r["lifelong"]["variants"]["cat"][key] for r in runs)
        out.append(f"- lifelong keep {key}: higher than B cat in {wins} of {len(runs)} seeds")
    return "\n".join(out)


def main(argv=None) -> None:
    path = (argv or sys.argv[1:])[0]
    with open(path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    print(tables(runs))


if __name__ == "__main__":
    main()
