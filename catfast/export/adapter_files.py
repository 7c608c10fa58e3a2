"""What the export writes or checks per adapter: the adapters' names (they become file names) and, in
adapter-inputs mode, each adapter's LoRA feeds (safetensors and an ONNX Runtime adapter file)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort
import safetensors.torch
import torch

from catfast.errors import ExportError


def _check_labels(specs: Sequence) -> None:
    """The adapters' names (``AdapterSpec.label``) become file and folder names in the export: unique, plain,
    never '.' or '..'."""
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ExportError(f"two adapters are named {dup[0]!r}; name them with --adapter NAME=FILE")
    for label in labels:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or set(label) == {"."}:
            raise ExportError(
                f"adapter name {label!r} may use only letters, digits, '_', '.' and '-', and must not be '.' or '..'"
            )


def _write_adapter_feeds(tmp: Path, label: str, component: str, feeds: dict[str, torch.Tensor]) -> dict:
    """``adapters/LABEL/COMPONENT.safetensors`` (input name -> tensor) and the same as an ORT adapter file."""
    folder = tmp / "adapters" / label
    folder.mkdir(parents=True, exist_ok=True)
    st = folder / f"{component}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in feeds.items()}, str(st))
    shutil.copymode(tmp / component / "model.onnx", st)  # safetensors writes 0600; give it the graph's mode
    files = {"safetensors": str(st.relative_to(tmp))}
    if hasattr(ort, "AdapterFormat"):  # onnxruntime >= 1.20
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v.numpy()) for k, v in feeds.items()})
        ox = folder / f"{component}.onnx_adapter"
        fmt.export_adapter(str(ox))
        files["onnx_adapter"] = str(ox.relative_to(tmp))
    return files
