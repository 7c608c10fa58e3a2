"""ONNX Runtime execution providers: which really start here, the one to use, a session on a graph; and the
runners' error (the UNet runner in runner.py and the DiT runner in dit_runner.py share them)."""

from __future__ import annotations

import contextlib
import functools
import io
import os
from pathlib import Path

import numpy as np

from catfast.errors import CatfastError

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "DmlExecutionProvider", "CPUExecutionProvider")


class RunnerError(CatfastError):
    """The runner cannot do what was asked with this export."""


# --------------------------------------------------------------------------------------------- providers


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """The execution providers that really start here, in ORT's priority order. (onnxruntime-gpu lists CUDA
    and TensorRT as available even on a machine without a GPU or without the CUDA libraries; creating a
    session there silently falls back to CPU. Each provider is probed on a one-node graph.)"""
    import onnx  # lazy: onnx
    import onnxruntime as ort  # lazy: onnxruntime
    from onnx import TensorProto, helper  # lazy: onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    blob = model.SerializeToString()
    onnx.checker.check_model(model)
    found = []
    ort.set_default_logger_severity(4)  # the failing probes log errors that mean nothing to the user
    try:
        for provider in ort.get_available_providers():
            try:  # ORT's Python fallback prints "EP Error ... Falling back" to stdout
                with contextlib.redirect_stdout(io.StringIO()):
                    session = ort.InferenceSession(blob, providers=[provider])
            except Exception:
                continue
            if session.get_providers()[:1] == [provider]:
                found.append(provider)
    finally:
        ort.set_default_logger_severity(2)
    return tuple(found)


def pick_provider(requested: str | None = None) -> str:
    """``requested`` if it starts here (else RunnerError); by default CUDA, then DirectML, then CPU."""
    usable = usable_providers()
    if requested:
        if requested not in usable:
            raise RunnerError(f"execution provider {requested} does not start here; usable: {', '.join(usable)}")
        return requested
    return next(p for p in PREFERRED_PROVIDERS if p in usable)


def session(path: str | os.PathLike, provider: str, threads: int | None = None):
    """An ORT session on ``path`` with ``provider`` (and CPU for anything it does not take)."""
    import onnxruntime as ort  # lazy: onnxruntime

    options = ort.SessionOptions()
    options.log_severity_level = 3  # LoRA inputs with defaults make ORT warn once per input
    if threads:
        options.intra_op_num_threads = threads
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(str(path), options, providers=providers)


def read_adapter_feeds(folder: Path, manifest: dict, name: str) -> dict[str, dict[str, np.ndarray]]:
    """component -> the LoRA input feeds of adapter ``name`` in an adapter-inputs export (RunnerError for a
    merged export or an adapter it does not have)."""
    from safetensors.numpy import load_file  # lazy: safetensors

    if manifest["mode"] != "adapter_inputs":
        merged = ", ".join(a["name"] for a in manifest["adapters"]) or "none"
        raise RunnerError(
            f"{folder}: adapters are merged into this export ({merged}); --adapter selects an adapter "
            "only in an export made with --adapter-inputs"
        )
    entry = next((a for a in manifest["adapters"] if a["name"] == name), None)
    if entry is None:
        names = ", ".join(a["name"] for a in manifest["adapters"])
        raise RunnerError(f"{folder}: no adapter {name!r}; this export has {names}")
    return {c: load_file(folder / files["safetensors"]) for c, files in entry["weights"].items()}
