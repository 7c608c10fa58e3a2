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
    at batch 1 in ORT), so Flux is exported at a fixed batch of 1 (the runner calls it per row); SD3's batch is
    dynamic (traced at 2, proven at 2 and 1)."""
    return (1, 1) if family.name == "flux" else (2, 1)


def _transformer_graph(family, model) -> torch.nn.Module:
    if family.name == "flux":
        return (FluxTransformerGraph if model.config.guidance_embeds else FluxTransformerNoGuidanceGraph)(model)
    return SD3TransformerGraph(model)


def _random_case(family, model, batch: int, side: tuple[int, int], text_len: int, seed: int):
    """(latents [B, C, H, W], sigmas [B], cond) for one validation run: N(0, 1) states, sigmas in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, family.latent_channels(model), *side, generator=g)
    sigmas = torch.rand(batch, generator=g) * 0.98 + 0.01
    return latents, sigmas, family.example_cond(model, batch, text_len, generator=g)


def _feeds(spec_inputs: list[str], family, latents, sigmas, cond) -> dict[str, np.ndarray]:
    """The graph's named inputs for one case, built as the runner builds them."""
    spec = {"inputs": spec_inputs, "packing": "2x2" if family.packs_latents else "none"}
    spec["timestep"] = "sigma" if family.name == "flux" else "1000*sigma"
    np_cond = {k: v.numpy() for k, v in cond.items()}
    return transformer_feeds(spec, latents.numpy(), sigmas.numpy(), np_cond, family.flow.guidance)
