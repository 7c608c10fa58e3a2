"""The export's manifest.json: what is where (graph files, inputs and outputs, adapters and their feed
files, validation results, latent geometry), written by ``export_onnx`` and read back by the runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from catfast.errors import ModelLoadError
from catfast.export.graphs import _latent_factor

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "catfast-onnx/1"


def build_manifest(base, loaded, applied, adapter_files, components, dtype_name, opset, dynamic, adapter_inputs):
    adapters = []
    for spec, adapter in loaded:
        entry = {
            "name": spec.label,
            "file": str(Path(spec.path).absolute()) if spec.adapter is None else None,
            "scale": spec.scale,
            "format": adapter.source_format,
            "components": applied[spec.label]["components"],
            "not_exported": applied[spec.label]["not_exported"],
        }
        if adapter_inputs:
            entry["weights"] = adapter_files[spec.label]
        adapters.append(entry)
    vae = base.vae
    return {
        "format": MANIFEST_FORMAT,
        "mode": "adapter_inputs" if adapter_inputs else "merged",
        "dtype": dtype_name,
        "opset": opset,
        "dynamic": dynamic,
        "exporter": "torch.onnx.export(dynamo=False) (TorchScript)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "base": str((base.path or base.file).absolute()) if (base.path or base.file) is not None else None,
        "adapters": adapters,
        "components": components,
        "tokenizer": "tokenizer",
        "scheduler": "scheduler/scheduler_config.json",
        "latent": {
            "channels": base.unet.config.in_channels,
            "sample_size": base.unet.config.sample_size,
            "multiple_of": _latent_factor(base),
            "vae_scale_factor": base.vae_scale_factor,
            "scaling_factor": vae.config.scaling_factor,
        },
        "text": {"max_length": base.tokenizer.model_max_length},
    }


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """The manifest of an export folder, checked for the files it names (ModelLoadError if incomplete)."""
    folder = Path(model_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{folder}: not a catfast ONNX export (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path}: not readable JSON: {e}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ModelLoadError(f"{path}: unknown manifest format {manifest.get('format')!r}")
    for name, comp in manifest["components"].items():
        for key in ("file", "external_data"):
            if comp.get(key) and not (folder / comp[key]).is_file():
                raise ModelLoadError(f"{folder}: {name} is incomplete: {comp[key]} is missing")
    return manifest
