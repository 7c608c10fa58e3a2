"""One component (unet, text_encoder, vae_decoder) of a UNet base's ONNX export (``onnx.py``): traced into the
staging folder, merged or with LoRA inputs, checked with ``onnx.checker``, validated in ONNX Runtime against
PyTorch, and its manifest entry."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from catfast.adapters.adapter import LoraAdapter
from catfast.errors import ExportError
from catfast.export.adapter_files import _write_adapter_feeds
from catfast.export.adapter_inputs import LoraInputsGraph, adapter_feeds, detach_lora_inputs, lora_input_specs
from catfast.export.graphs import (
    _adapter_component,
    _dynamic_axes,
    _finalize,
    _graph,
    _inputs,
    _io_info,
    _source_model,
    _trace_to_onnx,
)
from catfast.export.validate import _validate, _validation_shapes
from catfast.integrations.models import BaseModel


@dataclass
class _Job:
    """What every component's export shares."""

    base: BaseModel
    loaded: list[tuple]  # (AdapterSpec, LoraAdapter) per adapter: export_onnx reads them
    tmp: Path
    dtype: torch.dtype
    dtype_name: str
    opset: int
    dynamic: bool
    adapter_inputs: bool
    external_over: int
    log: Callable[[str], None]
    adapter_files: dict[str, dict] = field(default_factory=dict)  # label -> component -> files


def _export_component(job: _Job, component: str) -> dict:
    """Export, check and validate one component into ``job.tmp/component``; its manifest entry."""
    t0 = time.perf_counter()
    traced = _trace_component(job, component)
    export_seconds = time.perf_counter() - t0
    try:
        onnx.checker.check_model(str(traced.path))
    except Exception as e:
        raise ExportError(f"{component}: onnx.checker rejected the exported graph: {e}") from None
    t1 = time.perf_counter()
    cases = _validation_cases(job, component, traced.lora_specs)
    ac = _adapter_component(component)
    v = _validate(job.base, component, traced.reference, traced.path, cases, job.dtype, job.dtype_name, job.dynamic, ac)
    job.log(
        f"{component}: exported in {export_seconds:.1f} s ({_size(traced.path.parent)}), ORT vs torch on "
        f"{len(v['runs'])} runs: max abs err {v['max_abs_err']:.2e}, max rel err {v['max_rel_err']:.2e} "
        f"(tolerance {v['tolerance']:.0e}, {time.perf_counter() - t1:.1f} s)"
    )
    _refuse_failed(component, v, job.dtype_name)
    return _component_entry(job, component, traced, v, export_seconds)


@dataclass
class _Traced:
    """One component's graph written to ``path`` (with ``data``, its external data file, or None), the fp32
    torch graph it is validated against, and its LoRA inputs (adapter-inputs mode)."""

    path: Path
    data: str | None
    reference: torch.nn.Module
    lora_specs: list


def _trace_component(job: _Job, component: str) -> _Traced:
    """Trace the component (in the export dtype; with LoRA inputs in adapter-inputs mode) and move the graph
    into ``job.tmp/component/model.onnx``."""
    base, dtype = job.base, job.dtype
    source = _source_model(base, component)  # fp32, merged in merged mode
    reference = _graph(component, source)
    # nn.Module.to, not diffusers' override, which warns about fp32-kept modules the UNet does not have
    model = torch.nn.Module.to(copy.deepcopy(source), dtype) if dtype != torch.float32 else source
    if model is not source and component == "text_encoder" and hasattr(model, "set_attn_implementation"):
        # The TorchScript exporter's SDPA symbolic builds the causal mask's constants in fp32, so an fp16 CLIP
        # graph fails to load in ORT ("LayerNormalization bound to float and float16"); eager attention
        # exports cleanly (and is validated like the rest).
        model.set_attn_implementation("eager")
    graph = _graph(component, model)
    ac = _adapter_component(component)
    lora_specs = lora_input_specs(model, [a for _, a in job.loaded], ac) if job.adapter_inputs and ac else []
    input_names, output_names = list(graph.input_names), list(graph.output_names)
    axes = _dynamic_axes(component, job.dynamic)
    batch, side, seq = _validation_shapes(base, component, job.dynamic)[0]
    named = _inputs(base, component, batch, side, seq, seed=0, dtype=dtype)
    args = [named[n] for n in input_names]  # the trace's order is the names' order
    if lora_specs:
        first_spec, first = next((s, a) for s, a in job.loaded if a.component(ac))
        graph = LoraInputsGraph(graph, model, lora_specs, num_inputs=len(input_names))
        feeds = adapter_feeds(first, lora_specs, ac, first_spec.scale, dtype)
        args += list(feeds.values())
        input_names += list(feeds)
        for i, s in enumerate(lora_specs):
            axes[s.name_a] = {0: f"rank_{i}"}
            axes[s.name_b] = {1: f"rank_{i}"}
    raw = job.tmp / f".raw-{component}"
    raw.mkdir()
    try:
        _trace_to_onnx(graph, args, raw / "model.onnx", input_names, output_names, axes, job.opset)
    except Exception as e:
        raise ExportError(f"{component}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    finally:
        if lora_specs:
            detach_lora_inputs(model)
    del graph, model
    path = job.tmp / component / "model.onnx"
    # LoRA inputs default to rank-1 zeros: fed nothing, the graph is the base model
    defaults = adapter_feeds(None, lora_specs, ac, 1.0, dtype) if lora_specs else {}
    data = _finalize(raw, path, job.external_over, defaults)
    return _Traced(path, data, reference, lora_specs)


def _validation_cases(job: _Job, component: str, lora_specs: list) -> list[tuple[str, LoraAdapter | None, float, dict]]:
    """(label, adapter, scale, feeds) of each validation case: "merged" in merged mode; in adapter-inputs mode
    the base (LoRA inputs not fed) and every adapter, whose feeds are also written next to the graph."""
    if not lora_specs:
        return [("merged", None, 0.0, {})]
    ac = _adapter_component(component)
    cases: list[tuple[str, LoraAdapter | None, float, dict]] = [("base", None, 0.0, {})]
    for spec, adapter in job.loaded:
        feeds = adapter_feeds(adapter, lora_specs, ac, spec.scale, job.dtype)
        cases.append((spec.label, adapter, spec.scale, feeds))
        if adapter.component(ac):
            files = _write_adapter_feeds(job.tmp, spec.label, component, feeds)
            job.adapter_files.setdefault(spec.label, {})[component] = files
    return cases


def _refuse_failed(component: str, v: dict, dtype_name: str) -> None:
    """ExportError when the validation saw a non-finite output or an error above the tolerance."""
    if not math.isfinite(v["max_rel_err"]):
        worst = next(r for r in v["runs"] if not math.isfinite(r["rel_err"]))
        raise ExportError(
            f"{component}: the outputs hold NaN or Inf (case {worst['case']}, batch {worst['batch']}): "
            "an adapter, alpha or scale with non-finite values?; nothing was written"
        )
    if not v["passed"]:
        worst = max(v["runs"], key=lambda r: r["rel_err"])
        raise ExportError(
            f"{component}: ONNX Runtime output differs from PyTorch: relative error {v['max_rel_err']:.3e} > "
            f"{v['tolerance']:.0e} ({dtype_name}; worst run: {worst['case']}, batch {worst['batch']}, "
            f"shape {worst['shape']}); nothing was written"
        )


def _component_entry(job: _Job, component: str, traced: _Traced, validation: dict, export_seconds: float) -> dict:
    """The component's entry in the manifest (``export_onnx`` lists its keys)."""
    inputs, outputs = _io_info(traced.path)
    lora_names = {n for sp in traced.lora_specs for n in (sp.name_a, sp.name_b)}
    shapes = {i["name"]: i["shape"] for i in inputs}
    inputs = [i for i in inputs if i["name"] not in lora_names]
    return {
        "file": f"{component}/model.onnx",
        "external_data": f"{component}/{traced.data}" if traced.data else None,
        "inputs": inputs,
        "outputs": outputs,
        "dtype": job.dtype_name,
        "opset": job.opset,
        # optional inputs (rank-1 zero defaults); each has its own dynamic rank axis
        "lora_inputs": [
            {
                "path": sp.path,
                "A": sp.name_a,
                "B": sp.name_b,
                "A_shape": shapes[sp.name_a],
                "B_shape": shapes[sp.name_b],
            }
            for sp in traced.lora_specs
        ],
        "validation": validation,
        "export_seconds": round(export_seconds, 2),
        "bytes": sum(f.stat().st_size for f in traced.path.parent.iterdir()),
    }


def _size(folder: Path) -> str:
    n = sum(f.stat().st_size for f in folder.iterdir())
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
