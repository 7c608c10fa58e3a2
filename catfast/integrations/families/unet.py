"""Stable Diffusion 1.x / 2.x / XL: ``UNet2DConditionModel`` (epsilon or v-prediction, DDPM training).

integrations/patch.py asks it which row sharing and attention stand-in a row-planned call may use; the UNet
objective (train/objective.py) does not call it yet. Forward: latents ``[B, 4, H, W]``, integer ``timestep``,
``encoder_hidden_states [B, 77, D]`` and, for SDXL, ``added_cond_kwargs`` (``text_embeds [B, 1280]``,
``time_ids [B, 6]``). Condition keys: ``prompt_embeds``, and for SDXL ``text_embeds``, ``time_ids``."""

from __future__ import annotations

import torch

from catfast.integrations.families.base import Cond, DenoiserFamily, first_output
from catfast.targets import ATTENTION_PROJECTIONS


class UNetFamily(DenoiserFamily):
    name = "unet"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    denoiser_key = "unet"
    denoiser_class = "UNet2DConditionModel"
    default_targets = ATTENTION_PROJECTIONS  # the CAT paper's (diffusers' SD/SDXL LoRA scripts' too)
    sharing = ("prefix", "twins")  # captions enter at cross-attention only
    row_attention = True
    flow = None  # DDPM: integrations/schedulers.py's training scheduler, epsilon or v
    patch = 1

    def pipeline_class(self, *, xl: bool = False) -> str:
        """StableDiffusionPipeline (SD 1.x / 2.x), or StableDiffusionXLPipeline with ``xl``."""
        return self.pipeline_classes[1 if xl else 0]

    def row_sharing(self, model: torch.nn.Module) -> tuple[str, ...]:
        """None for a UNet whose prefix (before the first LoRA layer or cross-attention) reads inputs other
        than the sample and timestep: SDXL's added text embeddings, class embeddings, an encoder_hid_proj."""
        reads_other_inputs = (getattr(model, "encoder_hid_proj", None) is not None
                              or getattr(model, "class_embedding", None) is not None
                              or model.config.addition_embed_type is not None)  # fmt: skip
        return () if reads_other_inputs else self.sharing

    def predict(self, model, latents: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        out = model(
            latents,
            sigmas,
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs=added or None,
            return_dict=False,
        )
        return first_output(out)


FAMILY = UNetFamily()
