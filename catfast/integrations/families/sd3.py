"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` in a ``StableDiffusion3Pipeline`` folder.

Forward: the VAE's 16-channel latents as they are (``[B, 16, H, W]``; the transformer patchifies 2x2
itself), ``encoder_hidden_states [B, 77 + L, D]`` (CLIP-L and CLIP-G penultimate states side by side, zero
padded to T5's width, then T5's tokens), ``pooled_projections [B, 2048]`` (both CLIPs' projections) and
``timestep = 1000 * sigma``. Condition keys: ``prompt_embeds``, ``pooled_prompt_embeds``."""

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

# diffusers' train_dreambooth_lora_sd3.py's default targets: the joint attention of every block, both streams
SD3_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)

# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


class SD3Family(DenoiserFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_key = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    default_targets = SD3_TARGETS
    sharing = ()
    # train_dreambooth_lora_sd3.py's defaults: weighting_scheme "logit_normal" (0, 1), static shift 3.0
    flow = FlowRecipe(weighting_scheme="logit_normal", shift=3.0)
    sampling = SamplingRecipe("cfg", False, 1.16, 7.0, "")  # encode_prompt's negative_prompt or ""
    patch = 2
    scheduler_config = SD3_SCHEDULER
    max_sequence_length = 256

    def encode_prompt(self, pipe, captions: list[str], *, max_sequence_length: int | None = None) -> Cond:
        length = max_sequence_length or self.max_sequence_length
        with pipeline_warnings(pipe):
            embeds, _, pooled, _ = pipe.encode_prompt(
                list(captions),
                None,
                None,
                device=text_device(pipe),
                do_classifier_free_guidance=False,
                max_sequence_length=length,
            )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, model, latents: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = compute_dtype(model)
        out = model(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            timestep=(sigmas * 1000).to(latents.device, dtype),
            return_dict=False,
        )
        return first_output(out)


FAMILY = SD3Family()
