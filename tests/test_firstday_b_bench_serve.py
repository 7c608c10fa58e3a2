"""Issue 26 §12: `catfast bench serve` with its defaults ran past 20 minutes (1024 adapters loaded into
diffusers one by one). The defaults load at most 16 into diffusers and run 32 requests, a progress line
starts each phase, and `--full` is the whole sweep. Also §11: the libraries' chatter (transformers'
torchvision fallback, diffusers' "No LoRA keys associated to CLIPTextModel", peft's notes) is silenced."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(900)
SMALL = "--model tiny --registered 1,2 --mixed 1,2 --batch 2 --adapters 2 --steps 1 --reps 1 --json"


def _bench(*extra: str) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-m", "catfast.cli", "bench", "serve", *SMALL.split(), *extra],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_defaults_are_the_quick_sweep_with_a_line_per_phase_and_no_chatter():
    out, log = _bench("--requests", "2")
    assert out["settings"]["diffusers_max"] == 16 and out["settings"]["registered"] == [1, 2]
    starts = [line for line in log.splitlines() if line.startswith("[")]
    assert [s.split("]")[0] + "]" for s in starts] == ["[1/3]", "[2/3]", "[3/3]"], log
    assert "adapter switch" in starts[0] and "throughput" in starts[2] and "s so far" in starts[2]
    assert log.rstrip().splitlines()[-1].startswith("done in ")
    for chatter in ("torchvision", "No LoRA keys", "Already found", "Already unmerged", "Warning"):
        assert chatter not in log, log
    import inspect

    from catfast.bench.serve import bench_serve

    defaults = {k: v.default for k, v in inspect.signature(bench_serve).parameters.items()}
    assert defaults["diffusers_max"] == 16 and defaults["requests"] == 32


def test_full_is_the_whole_sweep():
    out, _ = _bench("--full", "--requests", "2")
    assert out["settings"]["diffusers_max"] == 1024
    assert out["throughput"]["requests"] == 2  # an explicit option still wins over --full
