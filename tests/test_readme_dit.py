"""README.md's "Diffusion transformers" section runs as written, as a new user would run it: its bash block (one
command per family) on a folder of captioned images, then its Python block (mixed adapters on a DiT), each in a
fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from catfast.testing import make_data

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)


def _block(first_line: str, language: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(first_line)
    assert text[:start].endswith(f"```{language}\n"), f"{first_line!r} opens a {language} block"
    return text[start : text.index("```", start)]


def test_readme_dit_commands_and_snippet_run(tmp_path):
    make_data(tmp_path / "my-stars", n=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = _block("# diffusion transformers: one command per family", "bash")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, capture_output=True,
                            text=True, timeout=500, env=env)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for run in ("flux", "sd3", "qwen"):
        assert (tmp_path / "runs" / run / "adapter.safetensors").is_file()
    assert "transformer (family flux)" in result.stdout
    with Image.open(tmp_path / "flux-onnx-star.png") as im:  # drawn by ONNX Runtime alone, at the export's size
        assert im.mode == "RGB" and im.size[0] == im.size[1] >= 32
    snippet = _block("# mixed adapters on a DiT", "python")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(tmp_path / "flux-stars.png") as im:
        assert im.size == (32, 32)
