"""Issue 26 §10: the demo model in plain diffusers. README.md's snippet (the block that starts "# the demo
model and a shipped adapter in plain diffusers") runs as written in a fresh process, and its picture is
the one catfast's own sampler draws for the same prompt, adapter, seed, steps and guidance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIRST_LINE = "# the demo model and a shipped adapter in plain diffusers"

pytestmark = pytest.mark.timeout(600)


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(FIRST_LINE)
    assert text[:start].endswith("```python\n"), "the snippet is a python block"
    return text[start : text.index("```", start)]


def test_readme_diffusers_snippet_runs_and_matches_catfast(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _snippet()], cwd=tmp_path, capture_output=True, text=True, timeout=500, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(tmp_path / "striped-star.png") as im:
        theirs = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert theirs.shape == (32, 32, 3)

    from catfast.adapters.formats import read_adapter
    from catfast.demo.adapters import adapters_dir
    from catfast.eval.sampler import sample_images
    from catfast.integrations.models import load_base
    from catfast.integrations.peft_adapters import attach_adapter
    from catfast.shipped import model_path

    base = load_base(model_path())
    adapter = read_adapter(adapters_dir() / "striped-star.safetensors", models={"unet": base.unet})
    attach_adapter(base.unet, adapter, "t")
    (ours,) = sample_images(
        base, ["sks, a star on a green background"], adapters=["t"], seeds=[0], steps=20, guidance=5.0
    )
    diff = np.abs(theirs - np.asarray(ours, dtype=np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


def test_the_shipped_files_as_loaded_are_fp16():
    """Why the snippet casts: the shipped weights are fp16 (small files), which diffusers keeps on load."""
    from safetensors import safe_open

    from catfast.shipped import model_path

    with safe_open(str(model_path() / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        key = next(iter(f.keys()))
        assert str(f.get_tensor(key).dtype) == "torch.float16"
