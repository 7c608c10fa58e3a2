"""Export a base model with LoRA adapters to ONNX, prove each graph in ONNX Runtime, write a manifest.

Two modes:
- merged (default): every adapter is merged (at its scale) into a copy of the weights with catfast's merge
  op (the C++ extension where built), and the graphs carry the merged weights.
- adapter inputs: each LoRA layer's A/B become graph inputs (`catfast.export.adapter_inputs`), so one graph
  serves many adapters; per adapter, the tensors to feed are written next to the graph as safetensors and as
  an ONNX Runtime adapter file (`.onnx_adapter`, for `RunOptions.add_active_adapter`).

Layout of OUT (the diffusers ONNX layout, plus catfast's manifest):

    manifest.json                 what is where (see `export_onnx`)
    unet/model.onnx [+ model.onnx.data]      sample, timestep, encoder_hidden_states -> out_sample
    text_encoder/model.onnx       input_ids -> last_hidden_state, pooler_output          (on request)
    vae_decoder/model.onnx        latent_sample -> sample                                 (on request)
    adapters/NAME/unet.safetensors, adapters/NAME/unet.onnx_adapter                       (adapter inputs)
    tokenizer/ scheduler/         copied from the base, for the runner

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. Measured here (torch 2.13 CPU,
tiny UNet): it exports in 0.45 s with 6e-7 relative error in ORT, dynamic batch and spatial axes included,
and needs nothing beyond torch and onnx. The dynamo exporter gives the same parity but needs onnxscript (not
a dependency of catfast) and took 14 s for the same tiny UNet (30x slower), which would blow the test budget;
it is deprecated-but-working territory for TorchScript, so if a future torch drops `dynamo=False` this is
the one call to switch (`_trace_to_onnx`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from catfast.adapters.adapter import LoraAdapter
from catfast.adapters.formats import read_adapter
from catfast.adapters.merge import merge_adapter_, resolve_targets
from catfast.errors import ExportError, ModelLoadError
from catfast.export.adapter_files import _check_labels
from catfast.export.component_export import _export_component, _Job
from catfast.export.graphs import UNetGraph, _adapter_component, _source_model
from catfast.export.manifest import MANIFEST, build_manifest, read_manifest
from catfast.export.validate import TOLERANCE
from catfast.folders import check_target, staged_folder
from catfast.integrations.families import family_of
from catfast.integrations.models import BaseModel, resolve_base
from catfast.integrations.tokenizer import save_tokenizer
from catfast.integrations.word_embedding import install_for_export

__all__ = ["AdapterSpec", "ExportError", "TOLERANCE", "UNetGraph", "export_onnx", "read_manifest"]

COMPONENTS = ("unet", "text_encoder", "vae_decoder")
SUPPORTED_OPSETS = range(14, 21)  # 14: first with the attention ops diffusers traces to; 20: the exporter's newest
DEFAULT_OPSET = 17
# Weights above this go to one external data file next to the graph (protobuf's hard limit is 2 GiB per
# message; 64 MiB is left for the graph itself). An SD1.5 UNet in fp32 (3.4 GB) passes it; in fp16 (1.7 GB) not.
EXTERNAL_DATA_OVER = 2**31 - 2**26


@dataclass
class AdapterSpec:
    """One ``--adapter [NAME=]FILE[:SCALE]``: the adapter file, its scale and the name it gets in the export."""

    path: str
    scale: float = 1.0
    name: str | None = None
    adapter: LoraAdapter | None = None  # already in memory: path is then only a label

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        name = None
        m = re.match(r"^([A-Za-z0-9_.-]+)=(.+)$", text)
        if m and not os.path.exists(text):
            name, text = m.group(1), m.group(2)
        scale = 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head and not os.path.exists(text):
            try:
                scale = float(tail)
            except ValueError:
                if os.path.exists(head):
                    raise ExportError(f"--adapter {text}: scale {tail!r} is not a number (FILE:SCALE)") from None
            else:
                text = head
        if not math.isfinite(scale):
            raise ExportError(f"--adapter {text}: scale {scale} is not a finite number")
        return cls(path=text, scale=scale, name=name)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name.removesuffix(".safetensors")


def _check_fits(base, adapters: list[tuple[AdapterSpec, LoraAdapter]], components: Sequence[str]) -> dict:
    """Per adapter label: which exported components it changes; raises AdapterShapeError (via
    resolve_targets) if any of its layers does not fit, and ExportError if it changes nothing exported."""
    applied = {}
    for spec, adapter in adapters:
        hits = []
        for component in components:
            ac = _adapter_component(component)
            if ac and adapter.component(ac):
                resolve_targets(_source_model(base, component), adapter, ac)
                hits.append(component)
        skipped = [c for c in adapter.components() if c not in hits]
        if not hits:
            raise ExportError(
                f"{adapter.where()}: has layers for {', '.join(adapter.components())} only, none of which is "
                f"exported (--components {','.join(components)})"
            )
        applied[spec.label] = {"components": hits, "not_exported": skipped}
    return applied


def _read_adapters(specs: Sequence[AdapterSpec], base) -> list[tuple[AdapterSpec, LoraAdapter]]:
    _check_labels(specs)
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    return [(s, s.adapter if s.adapter is not None else read_adapter(s.path, models=models)) for s in specs]


def export_onnx(
    base: str | os.PathLike | BaseModel,
    out: str | os.PathLike,
    *,
    adapters: Sequence[AdapterSpec | str] = (),
    components: Sequence[str] | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = False,
    adapter_inputs: bool = False,
    overwrite: bool = False,
    external_data_over: int = EXTERNAL_DATA_OVER,
    log: Callable[[str], None] = lambda s: None,
    base_config: str | os.PathLike | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
) -> dict:
    """Export ``components`` of ``base`` (a diffusers folder, a single-file checkpoint, with ``base_config``
    the diffusers folder that completes a UNet-only file, or a loaded `BaseModel`) with ``adapters``
    (``"[NAME=]FILE[:SCALE]"`` strings or `AdapterSpec`) to the folder ``out``, and return the manifest (also
    written as ``out/manifest.json``).

    Each graph is checked with ``onnx.checker`` and run in ONNX Runtime (CPU provider) on random inputs at
    two shapes (another batch; with ``dynamic`` another latent size and text length too) against PyTorch with
    the same merged weights, in fp32 (the fp16 export's inputs rounded to fp16). Any relative error above
    ``TOLERANCE[dtype]`` fails the export. In adapter-inputs mode this is done for every adapter (and the
    base: LoRA inputs not fed) against the torch model with that adapter merged.

    The base is never changed: a folder is only read, and the weights an adapter merges into in a `BaseModel`
    are restored afterwards. The export is built in a temporary folder beside ``out`` and renamed into place
    only when every check passed, so a failed or interrupted export never looks complete; Ctrl-C and SIGTERM
    remove it, and the staging folder a killed export left is removed by the next export to ``out`` (it says
    so through ``log``). An existing non-empty ``out`` is refused unless ``overwrite``.

    Manifest: ``format``, ``mode`` ("merged" | "adapter_inputs"), ``dtype``, ``opset``, ``dynamic``,
    ``exporter``, versions, ``base``, ``adapters`` [{name, file, scale, components, weights?}], ``components``
    {name: {file, external_data, inputs, outputs (name/dtype/shape), dtype, opset, lora_inputs, validation
    {tolerance, max_abs_err, max_rel_err, runs}, export_seconds, bytes}}, ``tokenizer``, ``scheduler``,
    ``latent`` {channels, sample_size, multiple_of, vae_scale_factor, scaling_factor}.

    A FLUX.1 or SD3 pipeline folder (``model_index.json`` names a transformer family) is exported by
    ``catfast.export.dit.export_dit_onnx``: the transformer, text encoders and VAE decoder (default: all) at
    ``height`` x ``width`` pixels and ``max_sequence_length`` text tokens (defaults: the pipeline's); the
    manifest adds ``family``, ``transformer`` (input names, packing, timestep), ``sampler``, ``text``.
    ``height``, ``width`` and ``max_sequence_length`` are DiT options; ``fp16``, ``dynamic``, ``base_config``
    UNet ones (each refused in one line where it does not apply).
    """
    t_start = time.perf_counter()
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec.parse(a) for a in adapters]
    if _dit_folder(base):
        from catfast.export.dit import export_dit_onnx  # lazy: the DiT export's graphs

        if opset not in SUPPORTED_OPSETS:
            _check_options(["unet"], opset, False, [])
        return export_dit_onnx(
            base, out, specs=specs, components=components, fp16=fp16, opset=opset, dynamic=dynamic,
            adapter_inputs=adapter_inputs, overwrite=overwrite, external_data_over=external_data_over, log=log,
            base_config=base_config, height=height, width=width, max_sequence_length=max_sequence_length,
        )  # fmt: skip
    for flag, given in (("--height", height), ("--width", width), ("--max-sequence-length", max_sequence_length)):
        if given is not None:
            raise ExportError(
                f"{flag} is a DiT export option (FLUX.1 / SD3 pipeline folders); a UNet export takes its size from "
                "the UNet (--dynamic for any size)"
            )
    components = list(components) if components else ["unet"]
    components = list(dict.fromkeys(components))
    _check_options(components, opset, adapter_inputs, specs)
    out = Path(out).absolute()
    check_target(out, overwrite, ExportError)
    for s in specs:
        if s.adapter is None and not os.path.exists(s.path):
            raise ExportError(f"{s.path}: no such adapter file")
    dtype_name = "fp16" if fp16 else "fp32"
    dtype = torch.float16 if fp16 else torch.float32

    if isinstance(base, (str, os.PathLike)):
        log(f"loading base {base}")
        base = resolve_base(base, config=base_config)
    if base.is_sdxl:
        raise ExportError(f"{base.path or 'base'}: SDXL bases are not supported by the ONNX export yet (SD 1.x/2.x)")
    loaded = _read_adapters(specs, base)
    applied = _check_fits(base, loaded, components)

    saved = []  # (weight, original) of every weight a merge changes, restored at the end
    try:
        saved += install_for_export(base, loaded, "text_encoder" in components, log)
        with staged_folder(out, say=log) as tmp:  # SIGTERM removes it too; a killed run's is removed next time
            if not adapter_inputs:
                _merge_all(base, loaded, applied, saved, log)
            job = _Job(base, loaded, tmp, dtype, dtype_name, opset, dynamic, adapter_inputs, external_data_over, log)
            manifest_components = {component: _export_component(job, component) for component in components}
            _copy_tokenizer_and_scheduler(base, tmp)
            manifest = build_manifest(
                base,
                loaded,
                applied,
                job.adapter_files,
                manifest_components,
                dtype_name,
                opset,
                dynamic,
                adapter_inputs,
            )
            manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    finally:
        with torch.no_grad():
            for weight, original in reversed(saved):
                weight.copy_(original)
    log(f"wrote {out} in {manifest['export_seconds']:.1f} s")
    return manifest


def _dit_folder(base) -> bool:
    """Whether ``base`` is a diffusers pipeline folder of a transformer family (FLUX.1, SD3, Qwen-Image)."""
    if not isinstance(base, (str, os.PathLike)) or not (Path(base) / "model_index.json").is_file():
        return False
    try:
        return family_of(base).name != "unet"
    except ModelLoadError:
        return False


def _check_options(components: list[str], opset: int, adapter_inputs: bool, specs: list[AdapterSpec]) -> None:
    """ExportError for an unknown component, an unsupported opset, adapter inputs without adapters, or
    adapter names that cannot be file names."""
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ExportError(f"unknown component {bad[0] if bad else '(none)'!r}; choose from {', '.join(COMPONENTS)}")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset {opset} is not supported: choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
            f"(default {DEFAULT_OPSET})"
        )
    if adapter_inputs and not specs:
        raise ExportError("--adapter-inputs needs at least one --adapter (its layers become the graph's LoRA inputs)")
    _check_labels(specs)


def _merge_all(base, loaded, applied: dict, saved: list, log) -> None:
    """Merge every adapter at its scale into the components it changes (catfast's merge op: the C++
    extension where built); each changed weight's original is appended to ``saved`` first."""
    for spec, adapter in loaded:
        for component in applied[spec.label]["components"]:
            model, ac = _source_model(base, component), _adapter_component(component)
            saved += [(t.weight, t.weight.detach().clone()) for _, t in resolve_targets(model, adapter, ac).values()]
            n = merge_adapter_(model, adapter, ac, spec.scale)
            log(f"merged {n} {component} layers of {spec.label} at scale {spec.scale:g}")


def _copy_tokenizer_and_scheduler(base, tmp: Path) -> None:
    if base.path is not None and (base.path / "tokenizer").is_dir() and (base.path / "scheduler").is_dir():
        for name in ("tokenizer", "scheduler"):
            shutil.copytree(base.path / name, tmp / name)
        return
    save_tokenizer(base.tokenizer, tmp / "tokenizer")
    base.scheduler.save_pretrained(tmp / "scheduler")
