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


def test_catfast_serve_default_demo_subprocess():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CATFAST_API_KEY": "k1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "catfast.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
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
