"""The demo's Flux-style DiT base as diffusers parts (``catfast.demo.dit_pretrain`` trains them; the shipped folder
is catfast/demo/assets/dit_model): a ``FluxTransformer2DModel`` on the UNet demo's 8-channel 8x8 latents (packed
2x2: 16 tokens of 32), a tiny ``T5EncoderModel`` over factory_dit's offline T5 vocabulary, and the UNet demo
model's VAE, CLIP text encoder and tokenizer, reused as they are."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from catfast.integrations.factory_dit import t5_tokenizer
from catfast.integrations.factory_parts import seeded
from catfast.integrations.families.flux import FAMILY, FLUX_SCHEDULER

LATENT_CHANNELS = 8  # the UNet demo's VAE (catfast.demo.pretrain.LATENT_CHANNELS)
DIT_CONFIG = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,
    num_layers=2,  # double-stream blocks
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,  # T5's width
    pooled_projection_dim=64,  # the UNet demo's CLIP width
    guidance_embeds=False,  # FLUX.1-schnell style: not guidance-distilled
    axes_dims_rope=(8, 12, 12),
)
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
TEXT_LENGTH = 16  # T5 tokens: "sks, a large yellow star on a grey background" is 11 with </s>
COPIED = ("vae", "text_encoder", "tokenizer")  # from the UNet demo model, byte for byte


def build_parts(unet_demo: str | os.PathLike, seed: int = 0, init: str | os.PathLike | None = None) -> dict:
    """FluxPipeline components (fp32): a seeded transformer (``seed``) and T5 (``seed + 1``), or those of the
    earlier output ``init`` (a second stage), training mode; the UNet demo folder's VAE and CLIP text encoder,
    frozen; the flux family's scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    unet_demo = Path(unet_demo)
    tok2 = t5_tokenizer(TEXT_LENGTH)
    t5_config = T5Config(vocab_size=len(tok2), pad_token_id=0, eos_token_id=1, **T5_CONFIG)
    vae = AutoencoderKL.from_pretrained(unet_demo / "vae", torch_dtype=torch.float32)
    clip = CLIPTextModel.from_pretrained(unet_demo / "text_encoder", torch_dtype=torch.float32)
    if init is None:
        transformer = seeded(seed, lambda: FAMILY.denoiser_type()(**DIT_CONFIG))
        t5 = seeded(seed + 1, lambda: T5EncoderModel(t5_config))
    else:
        init = Path(init)
        transformer = FAMILY.denoiser_type().from_pretrained(init / "transformer", torch_dtype=torch.float32)
        t5 = T5EncoderModel.from_pretrained(init / "text_encoder_2", dtype=torch.float32)
    return dict(
        transformer=transformer.train().requires_grad_(True),
        text_encoder_2=t5.train().requires_grad_(True),
        tokenizer_2=tok2,
        vae=vae.eval().requires_grad_(False),
        text_encoder=clip.eval().requires_grad_(False),
        tokenizer=CLIPTokenizer.from_pretrained(unet_demo / "tokenizer"),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    )


def save_folder(parts: dict, folder: Path, unet_demo: str | os.PathLike) -> None:
    """``parts`` as a FluxPipeline folder with fp16 weights (the models are left in fp32); the UNet demo's VAE,
    CLIP and tokenizer folders copied as they are (``save_pretrained`` would rewrite their files)."""
    pipe = FAMILY.pipeline_type()(**parts)
    trained = ("transformer", "text_encoder_2")
    for name in trained:
        torch.nn.Module.to(parts[name], torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in trained:
        torch.nn.Module.to(parts[name], torch.float32)
    for name in COPIED:
        shutil.rmtree(folder / name)
        shutil.copytree(Path(unet_demo) / name, folder / name)


def load_flux(folder: str | os.PathLike):
    """A FluxPipeline folder (the DiT demo base) as the pipeline, fp32 on the CPU, frozen, progress bars off."""
    from catfast.integrations.models import quiet_progress_bars

    quiet_progress_bars()
    pipe = FAMILY.pipeline_type().from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
