"""catfast imports and reports its environment without triton, diffusers, onnx or the extension."""

import json
import subprocess
import sys

BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_pulls_in_no_optional_library():
    r = _run(
        "import sys, catfast\n"
        "optional = ('triton', 'diffusers', 'peft', 'onnx', 'onnxruntime', 'transformers')\n"
        "heavy = [m for m in optional if m in sys.modules]\n"
        "print(heavy)"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_import_and_merge_work_when_triton_extension_and_diffusers_are_missing():
    mods = ["triton", "diffusers", "peft", "onnx", "onnxruntime", "catfast._C"]
    r = _run(
        BLOCK.format(mods=mods)
        + (
            "import torch, catfast\n"
            "from catfast import env\n"
            "w = torch.zeros(4, 4); catfast.merge_lora_([w], [torch.ones(1, 4)], [torch.ones(4, 1)], [2.0])\n"
            "assert torch.equal(w, torch.full((4, 4), 2.0))\n"
            "print(env.has_triton().available, env.has_ext().available)\n"
            "print(env.has_ext().detail)"
        )
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "False False"
    assert "catfast._C" in lines[1] or "import" in lines[1]  # the reason names what failed


def test_env_module_prints_capabilities_with_reasons():
    r = subprocess.run([sys.executable, "-m", "catfast.env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("torch", "cuda", "triton", "catfast._C", "diffusers", "onnxruntime"):
        assert name in r.stdout
    r = subprocess.run([sys.executable, "-m", "catfast.env", "--json"], capture_output=True, text=True, timeout=120)
    caps = {c["name"]: c for c in json.loads(r.stdout)["capabilities"]}
    assert caps["torch"]["available"]
    for c in caps.values():
        assert c["available"] or c["detail"], f"{c['name']} unavailable without a reason"


def test_installed_transformers_accepts_the_installed_peft():
    """transformers 5.24.0 demands peft >= 0.22.0 (which did not exist) for every adapter call; the
    dependency bounds must never again resolve to a pair whose adapter path refuses to run."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations import peft as tf_peft

    needed = Version(tf_peft.MIN_PEFT_VERSION)
    assert Version(version("peft")) >= needed, (
        f"transformers {version('transformers')} needs peft >= {needed}, installed {version('peft')}"
    )


def test_readme_install_lines_say_which_torch_build_they_get():
    """Issue 26, item 1: PyPI's torch for Linux x86-64 is the CUDA build (about 2.7 GB with its libraries), so
    "torch first" alone never gave the CPU build on a normal machine. The README's CPU line must use PyTorch's
    CPU index, its GPU line PyPI's build, both at the version installed here (which the CI block pins too), and
    the old promise is gone."""
    import re
    from pathlib import Path

    import torch

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quick = readme[readme.index("## Quick start") : readme.index("## The demo")]
    version = torch.__version__.split("+")[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    cpu = [b for b in blocks if "download.pytorch.org/whl/cpu" in b]
    assert cpu and f"pip install torch=={version} --index-url https://download.pytorch.org/whl/cpu" in cpu[0]
    assert "catfast demo" in cpu[0]
    gpu = [b for b in blocks if f"pip install torch=={version} setuptools" in b]
    assert gpu, "the GPU install line (PyPI's CUDA build)"
    assert "CUDA 13 build" in quick and "2.7 GB" in quick and "192 MB" in quick
    assert "so pip takes the CPU build" not in readme
    ci = readme[readme.index("<!-- ci:test -->") :]
    assert f"pip install torch=={version} " in ci[: ci.index("```\n", 10)]
