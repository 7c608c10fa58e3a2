"""The results of `catfast.e4t.measure`: one row per run and the header line of results.jsonl, reading the
file back, and the markdown tables of grid.md (means, and differences paired by concept and seed)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch


def _row(concept, seed, method, steps, seconds, total, scores) -> dict:
    return dict(
        concept=concept,
        seed=seed,
        method=method,
        steps=steps,
        seconds=round(seconds, 2),
        total_seconds=round(total, 2),
        preservation=round(scores["preservation"], 4),
        identity=round(scores["identity"], 4),
        kps=round(scores["kps"], 4),
        load1=round(os.getloadavg()[0], 2),
    )


def _header(options: dict) -> dict:
    """What a results file needs to be reproduced and judged: the command, threads, torch, git head."""
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        git = None
    return dict(
        header=True,
        command=shlex.join(["python", "-m", "catfast.e4t.measure", *sys.argv[1:]]),
        options=options,
        threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        torch=torch.__version__,
        git=git,
        cpus=os.cpu_count(),
        load_at_start=[round(x, 2) for x in os.getloadavg()],
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def format_grid(rows: list[dict]) -> str:
    """A markdown table: per (method, steps), the mean (and min-max) over concepts and seeds."""
    keys = list(dict.fromkeys((r["method"], r["steps"]) for r in rows))
    lines = [
        "| method | steps | identity | preservation | KPS | seconds (tuning / train) | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, steps in keys:
        sel = [r for r in rows if r["method"] == method and r["steps"] == steps]

        def stat(k, sel=sel, digits=3):
            vals = [r[k] for r in sel]
            mean = sum(vals) / len(vals)
            return f"{mean:.{digits}f} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"

        lines.append(
            f"| {method} | {steps} | {stat('identity')} | {stat('preservation')} | {stat('kps')} | "
            f"{stat('seconds', digits=1)} | {len(sel)} |"
        )
    return "\n".join(lines)


def format_paired(rows: list[dict], against: tuple[str, int] = ("cat", 300)) -> str:
    """A markdown table: per (method, steps), identity, preservation and KPS minus those of ``against`` on
    the same (concept, seed): mean +- standard error of the differences (identity also min to max), and how
    many pairs have identity >= ``against``'s. Pairing removes the concept's own level (the base model's
    identity differs by concept). The base row pairs with every seed of its concept."""
    ref = {(r["concept"], r["seed"]): r for r in rows if (r["method"], r["steps"]) == tuple(against)}
    if not ref:
        return ""
    name = f"{against[0]}-{against[1]}"
    keys = [k for k in dict.fromkeys((r["method"], r["steps"]) for r in rows) if k != tuple(against)]
    lines = [
        f"| method | steps | identity - {name} | preservation - {name} | KPS - {name} | identity >= {name} |",
        "|---|---|---|---|---|---|",
    ]

    def mean_se(d):
        mean = sum(d) / len(d)
        if len(d) < 2:
            return f"{mean:+.3f}"
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        return f"{mean:+.3f} +- {se:.3f}"

    for method, steps in keys:
        pairs = []
        for r in rows:
            if (r["method"], r["steps"]) != (method, steps):
                continue
            matches = [v for (c, sd), v in ref.items() if c == r["concept"] and (r["seed"] is None or sd == r["seed"])]
            pairs += [(r, v) for v in matches]
        if not pairs:
            continue
        d = {k: [a[k] - b[k] for a, b in pairs] for k in ("identity", "preservation", "kps")}
        wins = sum(x >= 0 for x in d["identity"])
        lines.append(
            f"| {method} | {steps} | {mean_se(d['identity'])} ({min(d['identity']):+.3f} to "
            f"{max(d['identity']):+.3f}) | {mean_se(d['preservation'])} | {mean_se(d['kps'])} | "
            f"{wins} of {len(pairs)} |"
        )
    return "\n".join(lines)


def read_results(path: str | Path) -> tuple[dict | None, list[dict]]:
    """(header, rows) of a results.jsonl."""
    header, rows = None, []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            if item.get("header"):
                header = item
            else:
                rows.append(item)
    return header, rows


def report(rows: list[dict]) -> str:
    """grid.md: the means table, then the paired differences against CAT at 300 steps."""
    return format_grid(rows) + "\n\nPaired by (concept, seed):\n\n" + format_paired(rows) + "\n"
