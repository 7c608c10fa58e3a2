"""The graphs of a diffusion-transformer pipeline export (``dit.py``): the wrapper modules whose ``forward``
signatures are the graphs' input names, the RMSNorm swap the TorchScript exporter needs, and the batches and
named example inputs the transformer is traced and proven at."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from catfast.export.dit_runner import transformer_feeds
from catfast.integrations.families import FAMILIES


class FluxTransformerGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]


class FluxTransformerNoGuidanceGraph(FluxTransformerGraph):
    """FLUX.1-schnell and other transformers without a guidance embedding."""

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids):
        return super().forward(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, None
        )


class SD3TransformerGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]


class QwenTransformerGraph(torch.nn.Module):
    """QwenImageTransformer2DModel at one image size and text length, its rotary embedding in real arithmetic
    (diffusers computes it in complex numbers, which ONNX cannot express): the factors of the export's size are
    computed once (``prepare``) and applied by the family's ``real_rotary`` while the graph runs (equal to the
    complex path in fp32). Text states are padded to the export's length with ``encoder_hidden_states_mask`` 0,
    which the joint attention masks out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.factors = None
        self.side = None

    def prepare(self, side: tuple[int, int], text_len: int) -> QwenTransformerGraph:
        """Compute the rotary factors for latents of ``side`` (h, w) and ``text_len`` text tokens."""
        self.side = side
        self.factors = FAMILIES["qwenimage"].real_rotary_factors(self.model, side, text_len)
        return self

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep):
        if self.factors is None:
            raise RuntimeError("QwenTransformerGraph.prepare(side, text_len) first")
        h, w = self.side
        with FAMILIES["qwenimage"].real_rotary(self.model, self.factors):
            return self.model(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                timestep=timestep,
                img_shapes=[[(1, h // 2, w // 2)]] * hidden_states.shape[0],
                return_dict=False,
            )[0]


class ClipGraph(torch.nn.Module):
    """CLIPTextModel: input_ids -> last_hidden_state, pooler_output (Flux uses the pooled output)."""

    output_names = ["last_hidden_state", "pooler_output"]

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=False, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class ClipPenultimateGraph(ClipGraph):
    """CLIPTextModelWithProjection as SD3 reads it: the penultimate hidden states and the projected pooled."""

    output_names = ["penultimate_hidden_state", "text_embeds"]

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds


class T5Graph(ClipGraph):
    output_names = ["last_hidden_state"]

    def forward(self, input_ids):
        return self.model(input_ids, return_dict=True).last_hidden_state


class QwenTextGraph(torch.nn.Module):
    """Qwen-Image's Qwen2.5-VL text model as its pipeline reads it: ``input_ids`` and ``attention_mask`` (the
    chat-template prompt, right-padded) -> the last hidden states; the runner drops the template's prefix and
    the padding (``QwenImagePipeline._get_qwen_prompt_embeds``). Causal attention: padding after a caption
    leaves the caption's states as they are."""

    output_names = ["last_hidden_state"]

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1]


class QwenVaeDecoderGraph(torch.nn.Module):
    """Qwen-Image's video VAE decoding one frame: ``latent_sample`` ``[B, C, H, W]`` (de-normalised: latents x std
    + mean) -> ``sample`` ``[B, 3, 8H, 8W]``."""

    output_names = ["sample"]

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample[:, :, None], return_dict=False)[0][:, :, 0]


TEXT_GRAPHS = {"clip": ClipGraph, "clip_penultimate": ClipPenultimateGraph, "t5": T5Graph, "qwen_vl": QwenTextGraph}


def input_names_of(graph: torch.nn.Module) -> list[str]:
    """The graph's input names: its ``forward``'s parameters, in order (the one place names meet positions)."""
    return list(inspect.signature(graph.forward).parameters)


class _ManualRMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm in primitive ops: the TorchScript exporter has no symbolic for aten::rms_norm."""

    def __init__(self, norm: torch.nn.RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * self.weight if self.weight is not None else y


def _exportable(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a copy, changed in place) with every torch.nn.RMSNorm instance swapped for `_ManualRMSNorm`,
    and every "nearest-exact" ``Upsample`` by an integer factor set to "nearest" (the exporter has no symbolic for
    aten::_upsample_nearest_exact2d; for integer factors both read source pixel floor(i / s), the same output)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Upsample) and module.mode == "nearest-exact":
            factors = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,)
            if all(f is not None and float(f).is_integer() for f in factors):
                module.mode = "nearest"
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.RMSNorm):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, _ManualRMSNorm(module))
    return model


def _batches(family) -> tuple[int, int]:
    """The batch the transformer is traced at, and the validation runs' batches. Flux's trace bakes the batch
    into its rotary reshape (``apply_rotary_emb``'s ``x.reshape(*x.shape[:-1], -1, 2)``: a batch-2 trace fails
    at batch 1 in ORT), and Qwen-Image's rotary is the same reshape, so both are exported at a fixed batch of 1
    (the runner calls it per row); SD3's batch is dynamic (traced at 2, proven at 2 and 1)."""
    return (2, 1) if family.name == "sd3" else (1, 1)


def _transformer_graph(family, model, side: tuple[int, int] | None = None, text_len: int | None = None):
    """The family's transformer wrapper; Qwen-Image's with its rotary factors for ``side`` and ``text_len``
    (without them: only its input names can be read)."""
    if family.name == "flux":
        return (FluxTransformerGraph if model.config.guidance_embeds else FluxTransformerNoGuidanceGraph)(model)
    if family.name == "qwenimage":
        graph = QwenTransformerGraph(model)
        return graph.prepare(side, text_len) if side is not None else graph
    return SD3TransformerGraph(model)


def _random_case(family, model, batch: int, side: tuple[int, int], text_len: int, seed: int):
    """(latents [B, C, H, W], sigmas [B], cond) for one validation run: N(0, 1) states, sigmas in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, family.latent_channels(model), *side, generator=g)
    sigmas = torch.rand(batch, generator=g) * 0.98 + 0.01
    return latents, sigmas, family.example_cond(model, batch, text_len, generator=g)


def timestep_kind(family) -> str:
    """What the graph's ``timestep`` input holds: sigma (Flux, Qwen-Image) or 1000 sigma (SD3)."""
    return "1000*sigma" if family.name == "sd3" else "sigma"


def _feeds(spec_inputs: list[str], family, latents, sigmas, cond) -> dict[str, np.ndarray]:
    """The graph's named inputs for one case, built as the runner builds them."""
    spec = {"inputs": spec_inputs, "packing": "2x2" if family.packs_latents else "none"}
    spec["timestep"] = timestep_kind(family)
    np_cond = {k: v.numpy() for k, v in cond.items()}
    return transformer_feeds(spec, latents.numpy(), sigmas.numpy(), np_cond, family.flow.guidance)


CLIP_LENGTH = 77  # the CLIP tokenizers' length in the Flux and SD3 pipelines (tokenizer_max_length)


def _token_length(pipe, kind: str | None, length: int) -> int:
    """Tokens a text graph is traced at: T5's ``length``, CLIP's 77, Qwen2.5-VL's ``length`` plus its chat
    template's prefix (which the pipeline drops from the states)."""
    if kind == "t5":
        return length
    if kind == "qwen_vl":
        return length + pipe.prompt_template_encode_start_idx
    return CLIP_LENGTH


def _template(pipe) -> dict:
    """Qwen-Image's prompt template and the states it drops, for the runner; {} for the other families."""
    template = getattr(pipe, "prompt_template_encode", None)
    if template is None:
        return {}
    return {"template": template, "drop": pipe.prompt_template_encode_start_idx}
