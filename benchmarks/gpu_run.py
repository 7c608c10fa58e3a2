"""The stages of ``benchmarks/gpu.sh``: CUDA tests, then the benchmarks, each in its own process with a time
limit, every result appended as one JSON line to ``gpu-<device>.jsonl``. A failing or overrunning stage is
recorded (return code, output tail) and the next one runs: one broken stage must not cost the lease.

Sizing (full run, one H100-class GPU, ~8 minutes in all): an SD1.5 UNet forward at 512 px is ~0.8 TFLOP per
sample, so a CAT step at batch 4 (8 grad rows + 4 teacher rows, backward ~2x forward) is ~25 TFLOP, ~0.1 s
at a third of the bf16 peak; the timed steps cost seconds. What costs minutes is set-up: building random SD1.5
and SDXL UNets, Triton's first compilations and ``torch.compile`` of the reference step, which is why each stage
has its own limit below.

  python benchmarks/gpu_run.py [--smoke] [--out DIR] [--only tests,train,memory,serve,ops]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "catfast"]


def stages(smoke: bool) -> list[tuple[str, list[str], int]]:
    """(stage name, command, time limit in seconds), in the order they run: the most wanted first, since a
    lease can end before the last stage."""
    py, bench = [sys.executable], [*CLI, "bench"]
    if smoke:  # tiny shapes on the CPU: every stage's command line and output are exercised
        return [
            ("tests", [*py, *"-m pytest -q -x -k torch tests/kernels/test_lora_linear.py".split()], 300),
            *(
                (f"train-step-b{b}", [*bench, *f"train-step --model tiny --batch {b} --steps 1 --against official "
                                      "--no-memory --json".split()], 240)
                for b in (1, 2)
            ),
            ("serve", [*bench, *"serve --model tiny --registered 1,4 --mixed 1,2 --batch 2 --requests 2 --adapters 2 "
                       "--steps 1 --reps 1 --diffusers-max 2 --json".split()], 240),
            ("ops", [*bench, *"ops --smoke --json".split()], 240),
        ]  # fmt: skip

    def train(batch: int, extra: str, model: str = "sd15") -> list[str]:
        return [*bench, *f"train-step --model {model} --batch {batch} --steps 5 --rank 16 {extra} --json".split()]

    # caps sum to 430 s (7.2 min) after the build, sized from the first H200 lease (an SD1.5 step ~0.3 s; the
    # memory table with two entries per configuration took 55 s, it has four now, SD1.5 first); a stage that
    # overruns is cut and the next one runs. Not yet run end to end on a GPU with these caps. Each train-step
    # stage times catfast eager (reference, fused) and graphed (fused:graphed, one CUDA graph a step) against
    # the official and ai-toolkit steps, with launch_ops and host_ms per entry.
    contestants = "--against official,ai-toolkit --graphs"
    return [
        ("train-step-sd15-bf16-b1", train(1, f"--dtype bf16 {contestants}"), 80),
        ("memory", [*py, *"benchmarks/cuda_memory.py --ranks 16 --steps 3 --profile".split()], 80),
        ("tests", [*py, *"-m pytest -q -p no:cacheprovider -x -m cuda tests".split()], 60),
        ("train-step-sd15-bf16-b4", train(4, f"--dtype bf16 {contestants}"), 60),
        ("serve", [*bench, *"serve --model sd15 --registered 1,64,1024 --mixed 1,4,16 --requests 32 --steps 10 "
                   "--diffusers-max 16 --json".split()], 60),
        ("train-step-sdxl-bf16-b1", train(1, f"--dtype bf16 {contestants}", "sdxl"), 60),
        ("ops", [*bench, "ops", "--json"], 30),
    ]  # fmt: skip


def _json_lines(text: str) -> list:
    """Every line of ``text`` that parses as a JSON object (bench commands print one object last)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def run_stage(name: str, cmd: list[str], limit: int, log_dir: Path) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
    wall = round(time.time() - t0, 1)
    (log_dir / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
    objects = _json_lines(stdout)
    result = objects if name == "memory" else (objects[-1] if objects else None)  # memory: a line per configuration
    entry = dict(stage=name, rc=rc, wall_s=wall, cmd=" ".join(cmd[2:] if cmd[:2] == CLI[:2] else cmd[1:]))
    if name == "tests":
        entry["summary"] = (stdout.strip().splitlines() or [""])[-1]
    if result is not None:
        entry["result"] = result
    if rc:
        entry["tail"] = (stdout + stderr)[-1500:]
    return entry


def device_name(cuda: bool) -> str:
    if not cuda:
        return "cpu-smoke"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="benchmarks/gpu.sh's stages")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU (the test suite runs this)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for gpu-<device>.jsonl")
    ap.add_argument("--only", default="", help="comma-separated stage prefixes to run (default: all)")
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        print("gpu_run: no CUDA device; use --smoke for the CPU dry run", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    path = out / f"gpu-{device_name(cuda)}.jsonl"
    only = [s for s in a.only.split(",") if s]
    failed = 0
    with path.open("a") as f:
        head = dict(
            stage="env",
            python=sys.version.split()[0],
            torch=torch.__version__,
            cuda=cuda,
            device=torch.cuda.get_device_name() if cuda else "cpu",
            smoke=a.smoke,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        f.write(json.dumps(head) + "\n")
        for name, cmd, limit in stages(a.smoke):
            if only and not any(name.startswith(o) for o in only):
                continue
            entry = run_stage(name, cmd, limit, logs)
            failed += entry["rc"] != 0
            f.write(json.dumps(entry) + "\n")
            f.flush()
            print(f"{name:32s} rc={entry['rc']:<4d} {entry['wall_s']:7.1f} s  {entry.get('summary', '')}", flush=True)
    print(f"gpu_run: {path} ({failed} stage(s) failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
