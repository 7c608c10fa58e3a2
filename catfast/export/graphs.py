"""Building the ONNX graphs: the modules that give each exported component diffusers' input and output
names, their example inputs and dynamic axes, the trace (``torch.onnx.export`` with the TorchScript
exporter; ``catfast.export.onnx``'s docstring says why), and moving the traced file into place with its
weights in one external data file when they are too large for one protobuf."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

from catfast.errors import ExportError

PROMPTS = ["a photo of a cat sitting on a carpet", "", "a red car on a street at night"]


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


_GRAPHS = {"unet": UNetGraph, "text_encoder": TextEncoderGraph, "vae_decoder": VaeDecoderGraph}


def _graph(component: str, model) -> torch.nn.Module:
    return _GRAPHS[component](model)


def _source_model(base, component: str):
    return base.vae if component == "vae_decoder" else getattr(base, component)


def _adapter_component(component: str) -> str | None:
    """The adapter component whose layers apply to this graph (the VAE takes no LoRA)."""
    return None if component == "vae_decoder" else component


def _latent_factor(base) -> int:
    """Latent sides must be multiples of this (the UNet halves them once per down block)."""
    return 2 ** (len(base.unet.config.block_out_channels) - 1)


def _inputs(
    base, component: str, batch: int, side: tuple[int, int], seq: int, seed: int, dtype
) -> dict[str, torch.Tensor]:
    """Random (realistic) inputs of one component by graph input name (the graph class's ``input_names``, which
    are also its ``forward``'s parameters, in order); float ones in ``dtype``."""
    tensors = _input_tensors(base, component, batch, side, seq, seed, dtype)
    names = _GRAPHS[component].input_names
    if len(names) != len(tensors):
        raise ExportError(f"{component}: {len(tensors)} example inputs for the graph inputs {names}")
    return dict(zip(names, tensors))


def _input_tensors(base, component, batch, side, seq, seed, dtype) -> list[torch.Tensor]:
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


def _trace_to_onnx(module, args, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    """torch.onnx.export with the TorchScript exporter (see the module docstring for why)."""
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
    graph = onnx.load(str(path), load_external_data=False).graph

    def info(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return [info(v) for v in graph.input], [info(v) for v in graph.output]
