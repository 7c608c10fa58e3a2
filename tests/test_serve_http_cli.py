"""`catfast serve` as a user runs it: a subprocess with no --base serves the shipped demo model and adapters
on 127.0.0.1, behind an API key, and stops cleanly on Ctrl-C; bad options are one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from catfast.cli import main
from catfast.serve.loadtest import free_port, stop_server, wait_for_server

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


def serve_subprocess(*args: str, **env: str) -> tuple[subprocess.Popen, str]:
    """`python -m catfast.cli serve ARGS --port P` as a user starts it (``env`` added to the environment):
    (the process, its loopback URL)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "catfast.cli", "serve", *args, "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def test_catfast_serve_default_demo_subprocess():
    proc, url = serve_subprocess(CATFAST_API_KEY="k1")
    try:
        wait_for_server(url, proc)
        auth = {"Authorization": "Bearer k1"}
        assert httpx.get(url + "/v1/adapters").status_code == 401
        names = sorted(a["id"] for a in httpx.get(url + "/v1/adapters", headers=auth).json()["data"])
        assert names == ["striped-star", "tiger-ball", "toy-box"]
        r = httpx.post(
            url + "/v1/images/generations",
            json={"model": "toy-box", "prompt": "toy, a box", "steps": 2},
            headers=auth,
            timeout=120,
        )
        assert r.status_code == 200 and len(r.json()["data"]) == 1
    finally:
        out, _ = stop_server(proc)
    assert proc.returncode == 0, out
    assert "playground at http://127.0.0.1:" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "args,words",
    [
        (["--adapters", "/nonexistent/loras"], "--adapters must be an existing folder"),
        (["--api-key", " "], "--api-key must not be empty"),
        (["--port", "70000"], "70000"),
    ],
)
def test_bad_options_are_one_line_errors(args, words):
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code != 0
    assert words in result.output
    assert "Traceback" not in result.output


def test_serve_model_dit_is_the_shipped_dit_demo_and_model_with_base_is_refused():
    """`catfast serve --model dit` serves the shipped Flux-style demo (`--base demo-dit`): its three adapters at its
    32 px; `--model` with another --base is a one-line error."""
    from catfast.demo.adapters import CONCEPTS

    proc, url = serve_subprocess("--model", "dit")
    try:
        wait_for_server(url, proc)
        assert sorted(a["id"] for a in httpx.get(url + "/v1/adapters").json()["data"]) == sorted(CONCEPTS)
        r = httpx.post(url + "/v1/images/generations", json={"model": "tiger-ball", "prompt": "tiger, a ball",
                                                               "steps": 2}, timeout=120)  # fmt: skip
        assert r.status_code == 200 and len(r.json()["data"]) == 1
    finally:
        out, _ = stop_server(proc)
    assert "catfast serve: demo-dit" in out and "Traceback" not in out
    result = CliRunner().invoke(main, ["serve", "--model", "dit", "--base", "/some/folder"])
    assert result.exit_code != 0 and "--model dit picks a shipped demo model" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
