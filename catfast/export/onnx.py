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

import copy
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from catfast.adapters.adapter import LoraAdapter
from catfast.adapters.merge import merge_adapter_, resolve_targets
from catfast.errors import CatfastError, ModelLoadError
from catfast.export.adapter_inputs import LoraInputsGraph, adapter_feeds, detach_lora_inputs, lora_input_specs
from catfast.folders import check_target, staged_folder
from catfast.integrations.models import BaseModel

COMPONENTS = ("unet", "text_encoder", "vae_decoder")
SUPPORTED_OPSETS = range(14, 21)  # 14: first with the attention ops diffusers traces to; 20: the exporter's newest
DEFAULT_OPSET = 17
# Relative error (max |ort - torch| / max |torch|) an export may show against PyTorch with the same merged
# weights. fp32: the bound. fp16: ORT fp16 vs torch fp32 measured 7e-4 on the tiny UNet, where torch's
# own fp16 forward is 1.3e-3 off its fp32 one; 1e-2 leaves room for deeper nets and still catches a wrong graph.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# Weights above this go to one external data file next to the graph (protobuf's hard limit is 2 GiB per
# message; 64 MiB is left for the graph itself). An SD1.5 UNet in fp32 (3.4 GB) passes it; in fp16 (1.7 GB) not.
EXTERNAL_DATA_OVER = 2**31 - 2**26
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "catfast-onnx/1"
PROMPTS = ["a photo of a cat sitting on a carpet", "", "a red car on a street at night"]


class ExportError(CatfastError):
    """The export could not be made or did not prove correct (checker or ORT parity)."""


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


# ------------------------------------------------------------------------------------------ graph modules


class UNetGraph(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states) -> out_sample, as diffusers names them."""

    input_names = ["sample", "timestep", "encoder_hidden_states"]
    output_names = ["out_sample"]

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class TextEncoderGraph(torch.nn.Module):
    """input_ids (int64, padded to 77) -> last_hidden_state, pooler_output."""

    input_names = ["input_ids"]
    output_names = ["last_hidden_state", "pooler_output"]

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, return_dict=False)
        return out[0], out[1]


class VaeDecoderGraph(torch.nn.Module):
    """latent_sample (already divided by the VAE's scaling factor) -> sample (image in [-1, 1])."""

    input_names = ["latent_sample"]
    output_names = ["sample"]

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _graph(component: str, model) -> torch.nn.Module:
    return {"unet": UNetGraph, "text_encoder": TextEncoderGraph, "vae_decoder": VaeDecoderGraph}[component](model)


def _source_model(base, component: str):
    return base.vae if component == "vae_decoder" else getattr(base, component)


def _adapter_component(component: str) -> str | None:
    """The adapter component whose layers apply to this graph (the VAE takes no LoRA)."""
    return None if component == "vae_decoder" else component


def _latent_factor(base) -> int:
    """Latent sides must be multiples of this (the UNet halves them once per down block)."""
    return 2 ** (len(base.unet.config.block_out_channels) - 1)


def _inputs(base, component: str, batch: int, side: tuple[int, int], seq: int, seed: int, dtype) -> list[torch.Tensor]:
    """Random (realistic) inputs of one component: tensors in graph input order; float ones in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    unet = base.unet
    if component == "unet":
        sample = torch.randn(batch, unet.config.in_channels, *side, generator=g).to(dtype)
        n = base.scheduler.config.num_train_timesteps
        timestep = torch.randint(0, n, (batch,), generator=g).float()
        context = torch.randn(batch, seq, unet.config.cross_attention_dim, generator=g).to(dtype)
        return [sample, timestep, context]
    if component == "text_encoder":
        prompts = [PROMPTS[(seed + i) % len(PROMPTS)] for i in range(batch)]
        tok = base.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return [ids.input_ids.long()]
    latent = torch.randn(batch, base.vae.config.latent_channels, *side, generator=g) / base.vae.config.scaling_factor
    return [latent.to(dtype)]


def _dynamic_axes(component: str, dynamic: bool) -> dict[str, dict[int, str]]:
    if component == "unet":
        axes = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"}}
        axes["out_sample"] = {0: "batch"}
        if dynamic:
            for name in ("sample", "out_sample"):
                axes[name].update({2: "height", 3: "width"})
            axes["encoder_hidden_states"][1] = "sequence"
        return axes
    if component == "text_encoder":
        return {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}
    axes = {"latent_sample": {0: "batch"}, "sample": {0: "batch"}}
    if dynamic:
        axes["latent_sample"].update({2: "height", 3: "width"})
        axes["sample"].update({2: "image_height", 3: "image_width"})
    return axes


# ------------------------------------------------------------------------------------------------ export


def _trace_to_onnx(module, args, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    """torch.onnx.export with the TorchScript exporter (see the module docstring for why)."""
    import warnings

    with warnings.catch_warnings():
        # DeprecationWarning (legacy exporter) and TracerWarnings about shape checks diffusers makes in
        # Python (e.g. "upsample size must be even"): the graph is traced at a shape that passes them.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(args),
            str(path),
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def _finalize(raw_dir: Path, dest: Path, external_over: int, defaults: dict[str, torch.Tensor]) -> str | None:
    """Move the exporter's output in ``raw_dir`` to ``dest``: one .onnx file, or (weights over
    ``external_over`` bytes) the graph plus ONE external data file ``<dest>.data`` holding every tensor of
    1 KiB or more. The TorchScript exporter writes a >2 GB model as one file per tensor; those are copied
    into the data file in 64 MiB chunks, never loaded whole (measured on the SD1.5 UNet: loading them with
    onnx.load and saving again raised peak RSS by 2.1 GB and took 18 s). ``defaults`` become initializers of
    the graph inputs of the same name, which makes those inputs optional in ONNX Runtime (overridable
    initializers: what ORT's LoRA adapter files override). Returns the data file's name or None."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

    model = onnx.load(str(raw_dir / "model.onnx"), load_external_data=False)
    for name, value in defaults.items():
        model.graph.initializer.append(numpy_helper.from_array(value.numpy(), name))
    tensors = list(model.graph.initializer)
    external = {id(t): ExternalDataInfo(t) for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL}

    def nbytes(t) -> int:
        info = external.get(id(t))
        if info is None:
            return len(t.raw_data)
        return info.length if info.length else (raw_dir / info.location).stat().st_size - (info.offset or 0)

    dest.parent.mkdir(parents=True, exist_ok=True)
    if sum(nbytes(t) for t in tensors) <= external_over:
        if external:
            load_external_data_for_model(model, str(raw_dir))
        onnx.save_model(model, str(dest))
        shutil.rmtree(raw_dir)
        return None
    data = dest.name + ".data"
    with open(dest.parent / data, "wb") as out:
        for t in tensors:
            size = nbytes(t)
            if size < 1024 and id(t) not in external:
                continue
            offset = -(-out.tell() // 4096) * 4096  # page-aligned, so ORT can map tensors in place
            out.seek(offset)
            info = external.get(id(t))
            if info is None:
                out.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                with open(raw_dir / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    left = size
                    while left:
                        chunk = src.read(min(left, 64 << 20))
                        if not chunk:
                            raise ExportError(f"{raw_dir / info.location}: truncated external data")
                        out.write(chunk)
                        left -= len(chunk)
            del t.external_data[:]
            for key, value in (("location", data), ("offset", str(offset)), ("length", str(size))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(dest))
    shutil.copymode(dest, dest.parent / data)
    shutil.rmtree(raw_dir)
    return data


def _io_info(path: Path) -> tuple[list[dict], list[dict]]:
    """Names, element types and shapes (ints, or names for dynamic axes) of a graph's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def info(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return [info(v) for v in graph.input], [info(v) for v in graph.output]


def _ort_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer of a traced graph
    return ort.InferenceSession(str(path), options, providers=list(providers))


def _errors(got: list[np.ndarray], want: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs error, max relative error = max |got - want| / max |want|) over all outputs, in fp64."""
    abs_err, rel = 0.0, 0.0
    for g, w in zip(got, want):
        w64 = w.detach().double().numpy()
        g64 = g.astype(np.float64)
        if not (np.isfinite(g64).all() and np.isfinite(w64).all()):  # NaN compares as no error: fail it
            return float("inf"), float("inf")
        diff = float(np.abs(g64 - w64).max()) if w64.size else 0.0
        abs_err = max(abs_err, diff)
        rel = max(rel, diff / max(float(np.abs(w64).max()) if w64.size else 0.0, 1e-30))
    return abs_err, rel


@torch.no_grad()
def _torch_outputs(graph: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = graph(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


def _validation_shapes(base, component: str, dynamic: bool) -> list[tuple[int, tuple[int, int], int]]:
    """(batch, latent side, text length) of each validation run: the traced shape at batch 2, then batch 1
    (and, when dynamic, another spatial size and text length) to prove the dynamic axes. (Batch 1, not 3:
    on the SD1.5 UNet a batch-3 run set the export's peak memory, torch and ORT activations side by side.)"""
    s = base.unet.config.sample_size
    f = _latent_factor(base)
    seq = base.tokenizer.model_max_length
    if not dynamic or component == "text_encoder":
        return [(2, (s, s), seq), (1, (s, s), seq)]
    return [(2, (s, s), seq), (1, (s + f, s + 2 * f), seq + 3)]


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


def _check_labels(specs: Sequence[AdapterSpec]) -> None:
    """The adapters' names become file and folder names in the export: unique, plain, never '.' or '..'."""
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ExportError(f"two adapters are named {dup[0]!r}; name them with --adapter NAME=FILE")
    for label in labels:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or set(label) == {"."}:
            raise ExportError(
                f"adapter name {label!r} may use only letters, digits, '_', '.' and '-', and must not be '.' or '..'"
            )


def _read_adapters(specs: Sequence[AdapterSpec], base) -> list[tuple[AdapterSpec, LoraAdapter]]:
    from catfast.adapters.formats import read_adapter

    _check_labels(specs)
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    return [(s, s.adapter if s.adapter is not None else read_adapter(s.path, models=models)) for s in specs]


def export_onnx(
    base: str | os.PathLike | BaseModel,
    out: str | os.PathLike,
    *,
    adapters: Sequence[AdapterSpec | str] = (),
    components: Sequence[str] = ("unet",),
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = False,
    adapter_inputs: bool = False,
    overwrite: bool = False,
    external_data_over: int = EXTERNAL_DATA_OVER,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Export ``components`` of ``base`` (a diffusers folder, or a loaded `BaseModel`) with ``adapters``
    (``"[NAME=]FILE[:SCALE]"`` strings or `AdapterSpec`) to the folder ``out``, and return the manifest (also
    written as ``out/manifest.json``).

    Each graph is checked with ``onnx.checker`` and run in ONNX Runtime (CPU provider) on random inputs at
    two shapes (another batch; with ``dynamic`` another latent size and text length too) against PyTorch with
    the same merged weights, in fp32 (the fp16 export's inputs rounded to fp16). Any relative error above
    ``TOLERANCE[dtype]`` fails the export. In adapter-inputs mode this is done for every adapter (and the
    base: LoRA inputs not fed) against the torch model with that adapter merged.

    The base is never changed: a folder is only read, and the weights an adapter merges into in a `BaseModel`
    are restored afterwards. The export is built in a temporary folder beside ``out`` and renamed into place
    only when every check passed, so a failed or interrupted export never looks complete. An existing
    non-empty ``out`` is refused unless ``overwrite``.

    Manifest: ``format``, ``mode`` ("merged" | "adapter_inputs"), ``dtype``, ``opset``, ``dynamic``,
    ``exporter``, versions, ``base``, ``adapters`` [{name, file, scale, components, weights?}], ``components``
    {name: {file, external_data, inputs, outputs (name/dtype/shape), dtype, opset, lora_inputs, validation
    {tolerance, max_abs_err, max_rel_err, runs}, export_seconds, bytes}}, ``tokenizer``, ``scheduler``,
    ``latent`` {channels, sample_size, multiple_of, vae_scale_factor, scaling_factor}.
    """
    from catfast.integrations.models import load_base

    t_start = time.perf_counter()
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec.parse(a) for a in adapters]
    components = list(dict.fromkeys(components))
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
    out = Path(out).absolute()
    check_target(out, overwrite, ExportError)
    for s in specs:
        if s.adapter is None and not os.path.exists(s.path):
            raise ExportError(f"{s.path}: no such adapter file")
    dtype_name = "fp16" if fp16 else "fp32"
    dtype = torch.float16 if fp16 else torch.float32

    if isinstance(base, (str, os.PathLike)):
        log(f"loading base {base}")
        base = load_base(base)
    if base.is_sdxl:
        raise ExportError(f"{base.path or 'base'}: SDXL bases are not supported by the ONNX export yet (SD 1.x/2.x)")
    loaded = _read_adapters(specs, base)
    applied = _check_fits(base, loaded, components)

    saved = []  # (weight, original) of every weight a merge changes, restored at the end
    try:
        from catfast.e4t.embedding import install_for_export

        saved += install_for_export(base, loaded, "text_encoder" in components, log)
        with staged_folder(out) as tmp:
            if not adapter_inputs:  # merge every adapter (catfast's merge op: the C++ extension where built)
                for spec, adapter in loaded:
                    for component in applied[spec.label]["components"]:
                        model, ac = _source_model(base, component), _adapter_component(component)
                        saved += [
                            (t.weight, t.weight.detach().clone())
                            for _, t in resolve_targets(model, adapter, ac).values()
                        ]
                        n = merge_adapter_(model, adapter, ac, spec.scale)
                        log(f"merged {n} {component} layers of {spec.label} at scale {spec.scale:g}")
            job = _Job(base, loaded, tmp, dtype, dtype_name, opset, dynamic, adapter_inputs, external_data_over, log)
            manifest_components = {component: _export_component(job, component) for component in components}
            _copy_tokenizer_and_scheduler(base, tmp)
            manifest = _manifest(
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


def _copy_tokenizer_and_scheduler(base, tmp: Path) -> None:
    if base.path is not None and (base.path / "tokenizer").is_dir() and (base.path / "scheduler").is_dir():
        for name in ("tokenizer", "scheduler"):
            shutil.copytree(base.path / name, tmp / name)
        return
    from catfast.integrations.tokenizer import save_tokenizer

    save_tokenizer(base.tokenizer, tmp / "tokenizer")
    base.scheduler.save_pretrained(tmp / "scheduler")


@dataclass
class _Job:
    """What every component's export shares."""

    base: BaseModel
    loaded: list[tuple[AdapterSpec, LoraAdapter]]
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
    base, loaded, tmp, dtype, dtype_name = job.base, job.loaded, job.tmp, job.dtype, job.dtype_name
    opset, dynamic, log = job.opset, job.dynamic, job.log
    t0 = time.perf_counter()
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
    lora_specs = lora_input_specs(model, [a for _, a in loaded], ac) if job.adapter_inputs and ac else []
    input_names, output_names = list(graph.input_names), list(graph.output_names)
    axes = _dynamic_axes(component, dynamic)
    batch, side, seq = _validation_shapes(base, component, dynamic)[0]
    args = _inputs(base, component, batch, side, seq, seed=0, dtype=dtype)
    if lora_specs:
        first_spec, first = next((s, a) for s, a in loaded if a.component(ac))
        graph = LoraInputsGraph(graph, model, lora_specs, num_inputs=len(input_names))
        feeds = adapter_feeds(first, lora_specs, ac, first_spec.scale, dtype)
        args += list(feeds.values())
        input_names += list(feeds)
        for i, s in enumerate(lora_specs):
            axes[s.name_a] = {0: f"rank_{i}"}
            axes[s.name_b] = {1: f"rank_{i}"}

    folder = tmp / component
    raw = tmp / f".raw-{component}"
    raw.mkdir()
    try:
        _trace_to_onnx(graph, args, raw / "model.onnx", input_names, output_names, axes, opset)
    except Exception as e:
        raise ExportError(f"{component}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    finally:
        if lora_specs:
            detach_lora_inputs(model)
    del graph
    if model is not source:
        del model
    path = folder / "model.onnx"
    # LoRA inputs default to rank-1 zeros: fed nothing, the graph is the base model
    data = _finalize(
        raw, path, job.external_over, adapter_feeds(None, lora_specs, ac, 1.0, dtype) if lora_specs else {}
    )
    export_seconds = time.perf_counter() - t0
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ExportError(f"{component}: onnx.checker rejected the exported graph: {e}") from None

    # the tensors each adapter feeds (adapter-inputs mode), saved next to the graph
    cases: list[tuple[str, LoraAdapter | None, float, dict]] = []
    if lora_specs:
        cases.append(("base", None, 0.0, {}))  # LoRA inputs not fed: their zero defaults
        for spec, adapter in loaded:
            feeds = adapter_feeds(adapter, lora_specs, ac, spec.scale, dtype)
            cases.append((spec.label, adapter, spec.scale, feeds))
            if adapter.component(ac):
                job.adapter_files.setdefault(spec.label, {})[component] = _write_adapter_feeds(
                    tmp, spec.label, component, feeds
                )
    else:
        cases.append(("merged", None, 0.0, {}))

    t1 = time.perf_counter()
    validation = _validate(base, component, reference, path, cases, dtype, dtype_name, dynamic, ac)
    v = validation
    log(
        f"{component}: exported in {export_seconds:.1f} s ({_size(folder)}), ORT vs torch on "
        f"{len(v['runs'])} runs: max abs err {v['max_abs_err']:.2e}, max rel err {v['max_rel_err']:.2e} "
        f"(tolerance {v['tolerance']:.0e}, {time.perf_counter() - t1:.1f} s)"
    )
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
    inputs, outputs = _io_info(path)
    lora_names = {n for sp in lora_specs for n in (sp.name_a, sp.name_b)}
    shapes = {i["name"]: i["shape"] for i in inputs}
    inputs = [i for i in inputs if i["name"] not in lora_names]
    return {
        "file": f"{component}/model.onnx",
        "external_data": f"{component}/{data}" if data else None,
        "inputs": inputs,
        "outputs": outputs,
        "dtype": dtype_name,
        "opset": opset,
        # optional inputs (rank-1 zero defaults); each has its own dynamic rank axis
        "lora_inputs": [
            {
                "path": sp.path,
                "A": sp.name_a,
                "B": sp.name_b,
                "A_shape": shapes[sp.name_a],
                "B_shape": shapes[sp.name_b],
            }
            for sp in lora_specs
        ],
        "validation": validation,
        "export_seconds": round(export_seconds, 2),
        "bytes": sum(f.stat().st_size for f in folder.iterdir()),
    }


def _write_adapter_feeds(tmp: Path, label: str, component: str, feeds: dict[str, torch.Tensor]) -> dict:
    """``adapters/LABEL/COMPONENT.safetensors`` (input name -> tensor) and the same as an ORT adapter file."""
    import onnxruntime as ort
    import safetensors.torch

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


@torch.no_grad()
def _validate(base, component, reference, path, cases, dtype, dtype_name, dynamic, ac) -> dict:
    """Run the exported graph in ORT (CPU) for every case at every validation shape against fp32 torch."""
    try:
        session = _ort_session(path)
    except Exception as e:  # a graph the checker accepts can still fail ORT's type/shape inference
        raise ExportError(f"{component}: ONNX Runtime cannot load the exported graph: {e}") from None
    names = [i.name for i in session.get_inputs()]
    source = _source_model(base, component)
    runs = []
    for label, adapter, scale, feeds in cases:
        saved = None
        if adapter is not None and adapter.component(ac):  # torch reference: this adapter merged, restored after
            targets = resolve_targets(source, adapter, ac)
            saved = [(t.weight, t.weight.detach().clone()) for _, t in targets.values()]
            merge_adapter_(source, adapter, ac, scale)
        try:
            for i, (batch, side, seq) in enumerate(_validation_shapes(base, component, dynamic)):
                inputs = _inputs(base, component, batch, side, seq, seed=100 + i, dtype=dtype)
                feed = {n: t.numpy() for n, t in zip(names, inputs)}
                feed.update({k: v.numpy() for k, v in feeds.items()})
                got = session.run(None, feed)
                want = _torch_outputs(reference, [t.float() if t.is_floating_point() else t for t in inputs])
                abs_err, rel = _errors(got, want)
                shape = list(inputs[0].shape)
                runs.append({"case": label, "batch": batch, "shape": shape, "abs_err": abs_err, "rel_err": rel})
        finally:
            for w, value in saved or ():
                w.copy_(value)
    tol = TOLERANCE[dtype_name]
    max_abs = max(r["abs_err"] for r in runs)
    max_rel = max(r["rel_err"] for r in runs)
    return {
        "provider": "CPUExecutionProvider",
        "tolerance": tol,
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "passed": bool(math.isfinite(max_rel) and max_rel <= tol),
        "runs": runs,
    }


def _size(folder: Path) -> str:
    n = sum(f.stat().st_size for f in folder.iterdir())
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _manifest(base, loaded, applied, adapter_files, components, dtype_name, opset, dynamic, adapter_inputs):
    import onnx
    import onnxruntime as ort

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
        "base": str(base.path.absolute()) if base.path is not None else None,
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
