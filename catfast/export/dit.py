"""ONNX export of a diffusion-transformer pipeline folder (FLUX.1, SD3/3.5): the transformer (adapters merged
into a copy, or each LoRA layer's A/B as graph inputs), the text encoders and the VAE decoder, every graph
proven in ONNX Runtime, and a manifest the DiT runner (``dit_runner.py``) reads.

Every graph's inputs are NAMED, and every feed is by name: the wrapper modules' (``dit_graphs.py``) ``forward``
signatures are the input names (``input_names_of``), the trace's arguments are taken from a name -> tensor dict
in that order, the written graph's inputs are checked against the names, and ORT is always fed a dict.

    transformer   flux: hidden_states [B, N, 64] (2x2-packed tokens), encoder_hidden_states [B, L, D],
                  pooled_projections [B, P], timestep [B] (sigma), img_ids [N, 3], txt_ids [L, 3],
                  guidance [B] (guidance-distilled models) -> out_hidden_states
                  sd3:  hidden_states [B, 16, H, W], encoder_hidden_states [B, 77 + L, D],
                  pooled_projections [B, P], timestep [B] (1000 sigma) -> out_hidden_states
                  qwenimage: hidden_states [1, N, 4C] (2x2-packed), encoder_hidden_states [1, L, D],
                  encoder_hidden_states_mask [1, L] (0: padding), timestep [1] (sigma) -> out_hidden_states
    text_encoder* input_ids [B, max_length] -> (states, pooled): Flux's CLIP (pooler_output) and T5; SD3's two
                  CLIPs (penultimate states, projected pooled) and T5
    vae_decoder   latent_sample (latents / scaling_factor + shift_factor) -> sample

    text_encoder  qwenimage: input_ids, attention_mask [B, drop + L] (the chat template, right-padded) -> the last
                  hidden states (the runner drops the template's ``drop`` states and the padding)
    vae_decoder   qwenimage: latent_sample (latents x std + mean, per channel) -> sample (one video frame)

Exported at one latent size (``height`` x ``width`` pixels) and text length; the batch axis is dynamic (SD3)
or 1 (Flux, Qwen-Image: ``dit_graphs._batches``). Qwen-Image's complex rotary embedding is computed in real
arithmetic (``dit_graphs.QwenTransformerGraph``); its captions are padded to the export's text length with
``encoder_hidden_states_mask`` 0.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from catfast.adapters.formats import read_adapter
from catfast.adapters.merge import merge_adapter_, resolve_targets
from catfast.errors import ExportError
from catfast.export.adapter_files import _check_labels, _write_adapter_feeds
from catfast.export.adapter_inputs import LoraInputsGraph, adapter_feeds, detach_lora_inputs, lora_input_specs
from catfast.export.dit_graphs import (
    CLIP_LENGTH,
    TEXT_GRAPHS,
    QwenVaeDecoderGraph,
    _batches,
    _exportable,
    _feeds,
    _random_case,
    _template,
    _token_length,
    _transformer_graph,
    input_names_of,
    timestep_kind,
)
from catfast.export.dit_runner import load_tokenizer, transformer_output
from catfast.export.graphs import VaeDecoderGraph, _finalize, _io_info, _trace_to_onnx
from catfast.export.manifest import MANIFEST, MANIFEST_FORMAT
from catfast.export.validate import TOLERANCE, _errors, _ort_session
from catfast.folders import check_target, staged_folder
from catfast.integrations.families import family_of

# family -> (text encoder component, graph kind, tokenizer folder) in the pipeline's encode_prompt order
TEXT_ENCODERS = {
    "flux": [("text_encoder", "clip", "tokenizer"), ("text_encoder_2", "t5", "tokenizer_2")],
    "sd3": [
        ("text_encoder", "clip_penultimate", "tokenizer"),
        ("text_encoder_2", "clip_penultimate", "tokenizer_2"),
        ("text_encoder_3", "t5", "tokenizer_3"),
    ],
    "qwenimage": [("text_encoder", "qwen_vl", "tokenizer")],
}


# ----------------------------------------------------------------------------------------------- export


def check_dit_options(family, components, *, fp16, dynamic, base_config, adapter_inputs, specs) -> list[str]:
    """The components to export; ExportError (one line) for a family that cannot export, an option only UNet
    exports have, or a component this family lacks."""
    if family.name not in TEXT_ENCODERS:
        raise ExportError(f"{family.name}: no ONNX export for this family")
    for flag, given in (("--fp16", fp16), ("--dynamic", dynamic), ("--base-config", base_config)):
        if given:
            raise ExportError(
                f"{flag} is a UNet export option; a {family.name} export is fp32, traced at --height/--width "
                "with a dynamic batch, from a pipeline folder"
            )
    if adapter_inputs and not specs:
        raise ExportError("--adapter-inputs needs at least one --adapter (its layers become the graph's LoRA inputs)")
    every = ["transformer", *(c for c, _, _ in TEXT_ENCODERS[family.name]), "vae_decoder"]
    chosen = list(dict.fromkeys(components or every))
    bad = [c for c in chosen if c not in every]
    if bad:
        raise ExportError(f"{bad[0]!r} is not a {family.name} component; choose from {', '.join(every)}")
    return chosen


def export_dit_onnx(
    folder,
    out,
    *,
    specs: Sequence,
    components: Sequence[str] | None = None,
    fp16: bool = False,
    opset: int,
    dynamic: bool = False,
    adapter_inputs: bool = False,
    overwrite: bool = False,
    external_data_over: int,
    log: Callable[[str], None] = lambda s: None,
    base_config=None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
) -> dict:
    """``export_onnx`` for a FLUX.1 / SD3 pipeline folder (its docstring; this module's for the graphs)."""
    t_start = time.perf_counter()
    folder = Path(folder)
    family = family_of(folder)
    components = check_dit_options(
        family,
        components,
        fp16=fp16,
        dynamic=dynamic,
        base_config=base_config,
        adapter_inputs=adapter_inputs,
        specs=specs,
    )
    _check_labels(specs)
    out = Path(out).absolute()
    check_target(out, overwrite, ExportError)
    log(f"loading {family.name} pipeline {folder}")
    pipe = family.pipeline_type().from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    model = pipe.transformer.eval()
    factor = pipe.vae_scale_factor
    height, width = _size(pipe, family, height, width)
    length = max_sequence_length or family.max_sequence_length
    text_len = length + (CLIP_LENGTH if family.name == "sd3" else 0)

    loaded = [
        (s, s.adapter if s.adapter is not None else read_adapter(s.path, models={"transformer": model})) for s in specs
    ]
    applied = {}
    for spec, adapter in loaded:
        if not adapter.component("transformer"):
            raise ExportError(
                f"{adapter.where()}: has layers for {', '.join(adapter.components())} only; a {family.name} export "
                "applies transformer layers"
            )
        resolve_targets(model, adapter, "transformer")  # AdapterShapeError if it does not fit
        applied[spec.label] = [c for c in adapter.components() if c != "transformer"]

    check_target(out, overwrite, ExportError)
    adapter_files: dict = {}
    entries = {}
    with torch.no_grad(), staged_folder(out, say=log) as tmp:
        for component in components:
            t0 = time.perf_counter()
            if component == "transformer":
                entries[component] = _export_transformer(
                    family, model, loaded, tmp, opset, adapter_inputs, external_data_over, (height, width), text_len,
                    adapter_files, _write_adapter_feeds,
                )  # fmt: skip
            else:
                entries[component] = _export_other(pipe, folder, family, component, tmp, opset, (height, width), length)
            entries[component]["export_seconds"] = round(time.perf_counter() - t0, 2)
            v = entries[component]["validation"]
            log(
                f"{component}: exported and validated in {entries[component]['export_seconds']:.1f} s, ORT vs torch "
                f"max rel err {v['max_rel_err']:.2e} (tolerance {v['tolerance']:.0e})"
            )
        for name in ["scheduler", *(t for _, _, t in TEXT_ENCODERS[family.name])]:
            if (folder / name).is_dir():
                shutil.copytree(folder / name, tmp / name)
        transformer_spec = {
            "inputs": input_names_of(_transformer_graph(family, model)),
            "packing": "2x2" if family.packs_latents else "none",
            "timestep": timestep_kind(family),
            "text_length": text_len,
            "batch": "dynamic" if _batches(family)[0] != 1 else 1,
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "family": family.name,
            "mode": "adapter_inputs" if adapter_inputs else "merged",
            "dtype": "fp32",
            "opset": opset,
            "dynamic": False,
            "exporter": "torch.onnx.export(dynamo=False) (TorchScript)",
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            "base": str(folder.absolute()),
            "adapters": [
                {
                    "name": s.label,
                    "file": str(Path(s.path).absolute()) if s.adapter is None else None,
                    "scale": s.scale,
                    "format": a.source_format,
                    "components": ["transformer"],
                    "not_exported": applied[s.label],
                    **({"weights": adapter_files.get(s.label, {})} if adapter_inputs else {}),
                }
                for s, a in loaded
            ],
            "components": entries,
            "transformer": transformer_spec,
            "scheduler": "scheduler/scheduler_config.json",
            "sampler": _sampler_manifest(family.sampling),
            "latent": {
                "channels": family.latent_channels(model),
                "height": height,
                "width": width,
                "vae_scale_factor": factor,
                "scaling_factor": getattr(pipe.vae.config, "scaling_factor", None),
                "shift_factor": getattr(pipe.vae.config, "shift_factor", None) or 0.0,
                # Qwen-Image: per-channel normalisation instead (latents x std + mean before the decoder)
                **({"mean": list(pipe.vae.config.latents_mean), "std": list(pipe.vae.config.latents_std)}
                   if family.name == "qwenimage" else {}),  # fmt: skip
            },
            "text": {
                "max_sequence_length": length,
                "encoders": [
                    {
                        "component": c,
                        "kind": kind,
                        "tokenizer": tok,
                        "max_length": _token_length(pipe, kind, length),
                    }
                    for c, kind, tok in TEXT_ENCODERS[family.name]
                ],
                **_template(pipe),
            },
        }
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    log(f"wrote {out} in {manifest['export_seconds']:.1f} s")
    return manifest


def _size(pipe, family, height, width) -> tuple[int, int]:
    """Latent (height, width) of the export (default: the pipeline's default image size)."""
    factor = pipe.vae_scale_factor
    default = pipe.default_sample_size * factor
    height, width = height or default, width or default
    multiple = factor * family.patch
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ExportError(
            f"height and width must be positive multiples of {multiple} pixels (the VAE's factor {factor} x "
            f"{family.patch}x{family.patch} patches), got {height} x {width}"
        )
    return height // factor, width // factor


def _export_transformer(family, model, loaded, tmp, opset, adapter_inputs, external_over, side, text_len,
                        adapter_files, write_feeds) -> dict:  # fmt: skip
    """Trace the transformer (a copy: adapters merged, or LoRA A/B as inputs), then prove it: ORT on the
    runner's own feeds against ``family.predict`` of the fp32 torch model with the same adapter merged."""
    names = input_names_of(_transformer_graph(family, model))
    exported = _exportable(copy.deepcopy(model))
    if not adapter_inputs:
        for spec, adapter in loaded:
            merge_adapter_(exported, adapter, "transformer", spec.scale)
    graph = _transformer_graph(family, exported, side, text_len)
    lora_specs = lora_input_specs(exported, [a for _, a in loaded], "transformer") if adapter_inputs else []
    batches = _batches(family)
    latents, sigmas, cond = _random_case(family, model, batches[0], side, text_len, seed=0)
    feeds = {k: torch.from_numpy(v) for k, v in _feeds(names, family, latents, sigmas, cond).items()}
    input_names = list(names)
    axes = {}
    if batches[0] != 1:
        axes = {n: {0: "batch"} for n in names + ["out_hidden_states"] if n not in ("img_ids", "txt_ids")}
    if lora_specs:
        first_spec, first = loaded[0]
        graph = LoraInputsGraph(graph, exported, lora_specs, num_inputs=len(names))
        lora = adapter_feeds(first, lora_specs, "transformer", first_spec.scale)
        feeds |= lora
        input_names += list(lora)
        for i, s in enumerate(lora_specs):
            axes[s.name_a] = {0: f"rank_{i}"}
            axes[s.name_b] = {1: f"rank_{i}"}
    raw = tmp / ".raw-transformer"
    raw.mkdir()
    try:
        _trace_to_onnx(graph, [feeds[n] for n in input_names], raw / "model.onnx", input_names,
                       ["out_hidden_states"], axes, opset)  # fmt: skip
    except Exception as e:
        if "Complex" in str(e):
            raise ExportError(f"{family.name}: cannot export to ONNX: complex-valued tensors ({e})") from None
        raise ExportError(f"transformer: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    finally:
        detach_lora_inputs(exported)
    path = tmp / "transformer" / "model.onnx"
    defaults = adapter_feeds(None, lora_specs, "transformer") if lora_specs else {}
    data = _finalize(raw, path, external_over, defaults)
    onnx.checker.check_model(str(path))
    inputs, outputs = _io_info(path)
    graph_names = [i["name"] for i in inputs]
    if graph_names[: len(names)] != names:
        raise ExportError(f"transformer: the graph's inputs {graph_names[: len(names)]} are not {names}")

    cases = [("merged", None, 0.0, {})]
    if lora_specs:
        cases = [("base", None, 0.0, {})]
        for spec, adapter in loaded:
            lora = adapter_feeds(adapter, lora_specs, "transformer", spec.scale)
            cases.append((spec.label, adapter, spec.scale, {k: v.numpy() for k, v in lora.items()}))
            adapter_files.setdefault(spec.label, {})["transformer"] = write_feeds(tmp, spec.label, "transformer", lora)
    session = _ort_session(path)
    runs = []
    for label, adapter, scale, lora in cases:
        reference = copy.deepcopy(model)
        merging = [(a, s.scale) for s, a in loaded] if not lora_specs else ([(adapter, scale)] if adapter else [])
        for a, a_scale in merging:
            merge_adapter_(reference, a, "transformer", a_scale)
        for i, batch in enumerate(batches):
            latents, sigmas, cond = _random_case(family, model, batch, side, text_len, seed=100 + i)
            got = session.run(["out_hidden_states"], {**_feeds(names, family, latents, sigmas, cond), **lora})[0]
            got = transformer_output({"packing": "2x2" if family.packs_latents else "none"}, got, *side)
            want = family.predict(reference, latents, sigmas, cond)
            abs_err, rel = _errors([got], [want])
            runs.append(
                {"case": label, "batch": batch, "shape": list(latents.shape), "abs_err": abs_err, "rel_err": rel}
            )
    validation = _summary(runs, "transformer")
    lora_names = {n for sp in lora_specs for n in (sp.name_a, sp.name_b)}
    shapes = {i["name"]: i["shape"] for i in inputs}
    return {
        "file": "transformer/model.onnx",
        "external_data": f"transformer/{data}" if data else None,
        "inputs": [i for i in inputs if i["name"] not in lora_names],
        "outputs": outputs,
        "dtype": "fp32",
        "opset": opset,
        "lora_inputs": [
            {"path": s.path, "A": s.name_a, "B": s.name_b, "A_shape": shapes[s.name_a], "B_shape": shapes[s.name_b]}
            for s in lora_specs
        ],
        "validation": validation,
        "bytes": sum(f.stat().st_size for f in path.parent.iterdir()),
    }


def _export_other(pipe, folder, family, component, tmp, opset, side, length) -> dict:
    """A text encoder or the VAE decoder: trace, check, and compare ORT with torch at batch 2 and 1."""
    if component == "vae_decoder":
        source = pipe.vae
        graph = (QwenVaeDecoderGraph if family.name == "qwenimage" else VaeDecoderGraph)(source)
    else:
        kind = next(k for c, k, _ in TEXT_ENCODERS[family.name] if c == component)
        source = getattr(pipe, component)
        graph = TEXT_GRAPHS[kind](source)
    names = input_names_of(graph)
    outputs = list(graph.output_names)
    exported = copy.deepcopy(graph)
    _exportable(exported)
    tokenizer = next((t for c, _, t in TEXT_ENCODERS[family.name] if c == component), None)
    kind = next((k for c, k, _ in TEXT_ENCODERS[family.name] if c == component), None)
    max_length = _token_length(pipe, kind, length)

    def example(batch: int, seed: int) -> dict[str, torch.Tensor]:
        if component == "vae_decoder":
            g = torch.Generator().manual_seed(seed)
            return {"latent_sample": torch.randn(batch, family.latent_channels(pipe.transformer), *side, generator=g)}
        tok = load_tokenizer(folder / tokenizer, max_length)
        prompts = ["a photo of a cat sitting on a carpet", "", "a red car on a street at night"]
        encoded = tok.encode_batch([prompts[(seed + i) % 3] for i in range(batch)])
        case = {"input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.int64)}
        if "attention_mask" in names:
            case["attention_mask"] = torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)
        return case

    axes = {n: {0: "batch"} for n in names + outputs}
    raw = tmp / f".raw-{component}"
    raw.mkdir()
    args = example(2, 0)
    try:
        _trace_to_onnx(exported, [args[n] for n in names], raw / "model.onnx", names, outputs, axes, opset)
    except Exception as e:
        raise ExportError(f"{component}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    path = tmp / component / "model.onnx"
    data = _finalize(raw, path, 2**31 - 2**26, {})
    onnx.checker.check_model(str(path))
    inputs, outs = _io_info(path)
    session = _ort_session(path)
    runs = []
    for i, batch in enumerate((2, 1)):
        case = example(batch, 100 + i)
        got = session.run(outputs, {n: t.numpy() for n, t in case.items()})
        want = graph(**case)
        want = list(want) if isinstance(want, tuple) else [want]
        abs_err, rel = _errors(got, want)
        runs.append(
            {"case": "base", "batch": batch, "shape": list(case[names[0]].shape), "abs_err": abs_err, "rel_err": rel}
        )
    return {
        "file": f"{component}/model.onnx",
        "external_data": f"{component}/{data}" if data else None,
        "inputs": inputs,
        "outputs": outs,
        "dtype": "fp32",
        "opset": opset,
        "lora_inputs": [],
        "validation": _summary(runs, component),
        "bytes": sum(f.stat().st_size for f in path.parent.iterdir()),
    }


def _summary(runs: list[dict], component: str) -> dict:
    tol = TOLERANCE["fp32"]
    max_rel = max(r["rel_err"] for r in runs)
    v = {
        "provider": "CPUExecutionProvider",
        "tolerance": tol,
        "max_abs_err": max(r["abs_err"] for r in runs),
        "max_rel_err": max_rel,
        "passed": bool(math.isfinite(max_rel) and max_rel <= tol),
        "runs": runs,
    }
    if not v["passed"]:
        worst = max(runs, key=lambda r: r["rel_err"])
        raise ExportError(
            f"{component}: ONNX Runtime output differs from PyTorch: relative error {max_rel:.3e} > {tol:.0e} "
            f"(worst run: {worst['case']}, batch {worst['batch']}); nothing was written"
        )
    return v


def _sampler_manifest(recipe) -> dict:
    """The family's ``SamplingRecipe`` as the manifest's "sampler" entry, which the torch-free runner reads."""
    return {"guidance": recipe.guidance, "flow_sigmas": recipe.flow_sigmas, "max_shift": recipe.max_shift,
            "guidance_default": recipe.guidance_default, "negative": recipe.negative_default}  # fmt: skip
