"""Interrupted exports and trainings leave nothing behind (issue 27, defect 11): SIGTERM ends them the way
Ctrl-C does, so the staging folder goes; a staging folder that a SIGKILL left carries a marker (its target,
process and host), and the next run into the same --out removes it and says so; a folder nothing proves
stale (no marker) is left in place and named. On b9a3351 SIGTERM killed the export outright, leaving
OUT/../.OUT.partial-XXXX/, and the next export did not remove it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catfast.integrations.factory import init_model_folder
from catfast.testing import make_data

pytestmark = pytest.mark.timeout(600)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CATFAST_BACKEND": "torch", "CATFAST_CONV": "native"}
ENV.pop("TRITON_INTERPRET", None)


def catfast(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "catfast.cli", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(found, proc, what: str, within: float = 180.0):
    """The first truthy ``found()`` while ``proc`` runs."""
    deadline = time.monotonic() + within
    while True:
        value = found()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}:\n{proc.communicate()}")
        assert time.monotonic() < deadline, f"no {what} within {within} s"
        time.sleep(0.02)


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def test_11_export_sigterm_leaves_nothing_and_a_killed_exports_folder_is_removed(tmp_path):
    out = tmp_path / "e"
    # 1. SIGKILL mid-export: its staging folder stays (nothing can run), with its marker
    killed = catfast("export", "onnx", "--base", "demo", "--out", out)
    stale = wait_for(lambda: partials(out), killed, "a staging folder")[0]
    time.sleep(0.5)  # its marker is written right after the folder is made
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    assert stale.is_dir()
    foreign = tmp_path / f".{out.name}.partial-byhand"  # no marker: nothing proves it stale
    foreign.mkdir()

    # 2. the next export removes the killed one's folder and says so; SIGTERM then ends it like Ctrl-C
    proc = catfast("export", "onnx", "--base", "demo", "--out", out)
    own = wait_for(lambda: [p for p in partials(out) if p not in (stale, foreign)], proc, "its staging folder")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, stdout, stderr)  # click's "Aborted!", not death by signal
    assert "Aborted" in stderr and "Traceback" not in stderr, stderr
    assert f"removed {stale}: the staging folder of an interrupted run" in stdout, stdout
    assert f"left {foreign} in place" in stdout, stdout
    assert partials(out) == [foreign], (own, partials(out))
    assert not out.exists()


def test_11_training_sigterm_leaves_nothing_and_a_killed_runs_partial_checkpoint_is_removed(tmp_path):
    tiny = init_model_folder("tiny", tmp_path / "tiny")
    data = make_data(tmp_path / "stars")
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = ["train", "--base", tiny, "--data", data, "--trigger", "sks", "--out", out, "--rank", 4, "--steps", 100000]
    args += ["--batch-size", 2, "--checkpoint-every", 1, "--no-progress"]

    def interrupted(*extra) -> str:
        """Run until a new checkpoint is written, then SIGTERM (a checkpoint every step: the signal may well
        land in the middle of one); its stderr."""
        before = sorted(ckpts.glob("step-*"))
        proc = catfast(*args, *extra)
        wait_for(lambda: sorted(ckpts.glob("step-*")) not in ([], before), proc, "a new checkpoint", within=300)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, (proc.returncode, stdout, stderr)  # "Aborted!", not death by SIGTERM
        assert "Aborted" in stderr and "Traceback" not in stderr, stderr
        hidden = [p.name for p in ckpts.iterdir() if not p.name.startswith("step-")]
        assert hidden == [], hidden
        return stderr

    interrupted()
    # a partial checkpoint folder as a SIGKILL leaves it: marked by a process that has since ended
    stale = ckpts / ".step-0000099.partial-deadbeef"
    stale.mkdir()
    code = (
        f"from pathlib import Path; from catfast.folders import mark_staging; mark_staging(Path({str(stale)!r}), 'x')"
    )
    assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 0
    stderr = interrupted("--resume")
    assert f"removed {stale}: the staging folder of an interrupted run" in stderr, stderr
