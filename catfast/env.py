"""Capability probes, each computed once: torch, CUDA, Triton (those two live in ``catfast.backends``, whose
probes ask them), the C++ extension, and the libraries catfast integrates with. `python -m catfast.env`
(`catfast env`) prints them with the reason for anything missing, then the table of ops x backends from
``catfast.backends`` (``--json``: both). Nothing here imports triton, diffusers or onnx until a probe is asked for."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

from catfast.backends import Capability, has_cuda, has_triton


@functools.cache
def has_ext() -> Capability:
    from catfast._ext import EXT, EXT_ERROR, build_info

    if EXT is None:
        return Capability("catfast._C", False, None, EXT_ERROR)
    info = build_info() or {}
    return Capability("catfast._C", True, None, f"built against torch {info.get('torch', '?')}")


def _package(dist: str, name: str | None = None) -> Capability:
    try:
        return Capability(name or dist, True, importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return Capability(name or dist, False, None, "not installed")


@functools.cache
def has_onnxruntime() -> Capability:
    try:
        import onnxruntime as ort
    except Exception as e:
        return Capability("onnxruntime", False, None, f"import failed: {type(e).__name__}: {e}")
    return Capability("onnxruntime", True, ort.__version__, "providers: " + ", ".join(ort.get_available_providers()))


def _tool(name: str, version_args: list[str]) -> Capability:
    path = shutil.which(name)
    if path is None:
        return Capability(name, False, None, "not on PATH")
    try:
        out = subprocess.run([path, *version_args], capture_output=True, text=True, timeout=20).stdout
        lines = [ln for ln in out.splitlines() if ln.strip()]
        line = next((ln for ln in lines if "release" in ln), lines[0] if lines else "")
    except (OSError, subprocess.SubprocessError) as e:
        line = f"version query failed: {e}"
    return Capability(name, True, None, line.strip())


def report() -> list[Capability]:
    """Every probe, in the order `python -m catfast.env` prints them."""
    import torch

    return [
        Capability("python", True, sys.version.split()[0]),
        Capability("torch", True, torch.__version__, f"{torch.get_num_threads()} CPU threads"),
        has_cuda(),
        has_triton(),
        has_ext(),
        _package("diffusers"),
        _package("peft"),
        _package("transformers"),
        _package("safetensors"),
        _package("onnx"),
        has_onnxruntime(),
        _tool("c++", ["--version"]),
        _tool("nvcc", ["--version"]),
    ]


def backend_table() -> dict:
    """``catfast.backends.table()`` with the ``CATFAST_BACKEND`` value it was made under (an invalid
    value is reported, not raised: the table still shows what could run)."""
    from catfast import backends

    try:
        forced = backends.forced()
        error = None
    except backends.BackendError as e:
        forced, error = None, str(e)
    rows = backends.table()
    return {"env": os.environ.get(backends.ENV_VAR) or None, "forced": forced, "error": error, "ops": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    caps = report()
    table = backend_table()
    if "--json" in argv:
        print(json.dumps({"capabilities": [asdict(c) for c in caps], "backends": table}, indent=2))
        return 0
    from catfast import __version__

    print(f"catfast {__version__}")
    for c in caps:
        state = "yes" if c.available else "no "
        version = c.version or ""
        detail = f"  ({c.detail})" if c.detail else ""
        print(f"  {c.name:<14} {state}  {version:<14}{detail}")
    device = table["ops"][0]["device"] if table["ops"] else "cpu"
    forced = f"CATFAST_BACKEND={table['env']}" if table["env"] else "CATFAST_BACKEND unset: automatic choice (*)"
    print(f"backends on {device} ({forced})")
    if table["error"]:
        print(f"  error: {table['error']}")
    for row in table["ops"]:
        state = "yes" if row["available"] else "no "
        mark = "*" if row["chosen"] else " "
        reason = f"  ({row['reason']})" if row["reason"] else ""
        print(f"  {row['op']:<22} {row['backend']:<7}{mark} {state}{reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
