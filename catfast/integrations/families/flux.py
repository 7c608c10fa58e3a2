"""FLUX.1 (dev / schnell): ``FluxTransformer2DModel`` in a ``FluxPipeline`` folder.

Forward: the VAE's 16-channel latents packed 2x2 into tokens (``[B, H/2 * W/2, 64]``), the T5 hidden states
``encoder_hidden_states [B, L, D]``, the CLIP pooled output ``pooled_projections [B, 768]``, ``timestep =
sigma`` (the transformer multiplies by 1000), position ids ``img_ids [H/2 * W/2, 3]`` (0, row, column) and
``txt_ids [L, 3]`` (zeros), and ``guidance [B]`` where ``guidance_embeds`` (dev: guidance-distilled, no CFG
rows). Condition keys: ``prompt_embeds``, ``pooled_prompt_embeds`` (``FluxPipeline.encode_prompt``'s), and
optionally ``guidance [B]`` (a sampler's value; absent: the training recipe's 3.5)."""

from __future__ import annotations

import torch

from catfast.integrations.families.base import (
    Cond,
    DenoiserFamily,
    FlowRecipe,
    SamplingRecipe,
    compute_dtype,
    first_output,
    pipeline_warnings,
    text_device,
)

# diffusers' train_dreambooth_lora_flux.py's targets (its --lora_layers default list): the double blocks'
# image and text attention, both feed-forwards; "attn.to_q/k/v" also match the single blocks' attention.
FLUX_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]`` (``FluxPipeline._pack_latents``: each 2x2 patch one token)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, H/2 * W/2, 4C]`` -> ``[B, C, H, W]``, ``pack``'s inverse (``height``, ``width``: latent pixels)."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[H/2 * W/2, 3]`` ids (0, row, column) of the packed tokens (``FluxPipeline._prepare_latent_image_ids``)."""
    # built on the device: a copy from pageable host memory would wait for the device queue on every step
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype=dtype)


class FluxFamily(DenoiserFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_key = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    default_targets = FLUX_TARGETS
    sharing = ()
    flow = FlowRecipe(dynamic=(256, 4096, 0.5, 1.15), guidance=3.5)
    sampling = SamplingRecipe("embed", True, 1.15, 3.5, None)
    patch = 2
    packs_latents = True
    scheduler_config = FLUX_SCHEDULER

    max_sequence_length = 512  # FLUX.1-dev's T5 length (schnell: 256)

    pack = staticmethod(pack)
    unpack = staticmethod(unpack)

    def encode_prompt(self, pipe, captions: list[str], *, max_sequence_length: int | None = None) -> Cond:
        length = max_sequence_length or self.text_length(pipe)
        with pipeline_warnings(pipe):
            embeds, pooled, _ = pipe.encode_prompt(
                list(captions), prompt_2=None, device=text_device(pipe), max_sequence_length=length
            )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def text_length(self, pipe) -> int:
        """T5 tokens of a caption: FLUX.1's 512, or the pipeline's ``tokenizer_2.model_max_length`` where shorter
        (the demo DiT's 16: its captions are a dozen words, and 512 padded tokens cost 16x the step)."""
        own = getattr(getattr(pipe, "tokenizer_2", None), "model_max_length", None)
        return min(self.max_sequence_length, own) if isinstance(own, int) and own > 0 else self.max_sequence_length

    def predict(self, model, latents: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _, h, w = latents.shape
        embeds = cond["prompt_embeds"]
        dtype = compute_dtype(model)
        guidance = None
        if model.config.guidance_embeds:  # the condition's per-row value (a sampler's), else the training recipe's
            given = cond.get("guidance")
            if given is None:
                guidance = torch.full((b,), self.flow.guidance, device=latents.device, dtype=torch.float32)
            else:
                guidance = given.to(latents.device, torch.float32)
        out = model(
            hidden_states=pack(latents).to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            timestep=sigmas.to(latents.device, dtype),
            img_ids=image_ids(h, w, latents.device, dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )
        return unpack(first_output(out), h, w)


FAMILY = FluxFamily()
