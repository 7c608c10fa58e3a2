"""benchmarks/gpu.sh, the one command for the day a GPU is lent, run end to end on the CPU with --smoke (tiny
shapes): every stage must exit 0 and leave its JSON line, so the script cannot rot between GPU loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_smoke_runs_every_stage(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CATFAST_BACKEND": "torch", "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "gpu-cpu-smoke.jsonl").read_text().splitlines()]
    assert lines[0]["stage"] == "env" and lines[0]["smoke"] is True
    stages = {x["stage"]: x for x in lines[1:]}
    assert set(stages) == {"tests", "train-step-b1", "train-step-b2", "serve", "ops"}
    assert all(x["rc"] == 0 for x in stages.values())
    step = stages["train-step-b2"]["result"]
    assert step["batch"] == 2 and step["against"]["official"]["median_ms"] > 0
    assert step["parity"]["loss_rel_err"] < 1e-4  # the fused and reference steps agree on the CPU too
    assert "passed" in stages["tests"]["summary"]
    assert (tmp_path / "logs" / "serve.log").read_text().startswith("$ ")
