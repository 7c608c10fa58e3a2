"""The graphs of a diffusion-transformer pipeline export (``dit.py``): the wrapper modules whose ``forward``
signatures are the graphs' input names, the RMSNorm swap the TorchScript exporter needs, and the batches and
named example inputs the transformer is traced and proven at."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from catfast.export.dit_runner import transformer_feeds


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
    """QwenImageTransformer2DModel at one image size and text length, its rotary embedding in real arithmetic.

    diffusers computes Qwen-Image's rotary factors as complex numbers (``QwenEmbedRope``: ``torch.polar``) and
    applies them with ``view_as_complex``; ONNX has no complex tensors. Here the factors of the export's size
    are computed once (``prepare``) and kept as real ``cos`` / ``sin`` constants, and while the graph runs the
    rotation of each interleaved pair is ``(a cos - b sin, a sin + b cos)``, the same product in real numbers
    (equal to the complex path bit for bit in fp32 on the tiny model). Text states are padded to the export's
    length with ``encoder_hidden_states_mask`` 0, which the joint attention masks out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.rope = None  # (image (cos, sin), text (cos, sin)), each [S, head_dim]
        self.side = None

    def prepare(self, side: tuple[int, int], text_len: int) -> QwenTransformerGraph:
        """Compute the rotary factors for latents of ``side`` (h, w) and ``text_len`` text tokens."""
        h, w = side
        self.side = (h, w)
        image, text = self.model.pos_embed([(1, h // 2, w // 2)], device="cpu", max_txt_seq_len=text_len)
        self.rope = tuple(
            (f.real.repeat_interleave(2, -1).contiguous(), f.imag.repeat_interleave(2, -1).contiguous())
            for f in (image, text)
        )
        return self

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep):
        import diffusers.models.transformers.transformer_qwenimage as qwen  # lazy: diffusers

        if self.rope is None:
            raise RuntimeError("QwenTransformerGraph.prepare(side, text_len) first")
        h, w = self.side
        complex_apply, rope_forward = qwen.apply_rotary_emb_qwen, self.model.pos_embed.forward
        qwen.apply_rotary_emb_qwen = _real_rotary
        self.model.pos_embed.forward = lambda *args, **kwargs: self.rope
        try:
            return self.model(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                timestep=timestep,
                img_shapes=[[(1, h // 2, w // 2)]] * hidden_states.shape[0],
                return_dict=False,
            )[0]
        finally:
            qwen.apply_rotary_emb_qwen = complex_apply
            self.model.pos_embed.forward = rope_forward


def _real_rotary(x: torch.Tensor, freqs, use_real: bool = False, use_real_unbind_dim: int = -1) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb_qwen`` for ``x`` ``[B, S, H, D]`` with real factors ``(cos, sin)``
    ``[S, D]`` (each pair's angle repeated): the complex product of interleaved pairs, in fp32."""
    cos, sin = (f[:, None] for f in freqs)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


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


TEXT_GRAPHS = {"clip": ClipGraph, "clip_penultimate": ClipPenultimateGraph, "t5": T5Graph}


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
    """``model`` (a copy, changed in place) with every torch.nn.RMSNorm instance swapped for `_ManualRMSNorm`."""
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
