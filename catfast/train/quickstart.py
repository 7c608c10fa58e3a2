"""A few real reference-CAT steps on a base model: the smoke run behind `catfast cat-step`.

It goes through the same parts the trainer uses (folder loading, tokenizer, text encoder, VAE,
peft LoRA, `cat_loss`, adapter file writing) on one image, so a new user sees the whole path work
before they have data. The full trainer (`catfast train`) is a separate module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from catfast.adapters.formats import write_adapter
from catfast.errors import CatfastError
from catfast.folders import check_output_file
from catfast.integrations.models import load_base
from catfast.integrations.peft_adapters import add_lora, extract_adapter
from catfast.targets import ATTENTION_PROJECTIONS
from catfast.train.captions import strip_trigger
from catfast.train.objective import cat_loss

DEFAULT_TARGETS = ATTENTION_PROJECTIONS  # the CAT paper's setup: every attention projection


@dataclass
class StepRecord:
    """One optimizer step: losses (fp32 floats) and wall time in seconds."""

    step: int
    loss: float
    ldm: float
    cat: float
    seconds: float


def synthetic_image(size: int, seed: int = 0):
    """A deterministic RGB PIL image (a coloured star on a plain background) of ``size`` x ``size``."""

    gen = torch.Generator().manual_seed(seed)
    bg, fg = (torch.randint(0, 256, (2, 3), generator=gen)).tolist()
    img = Image.new("RGB", (size, size), tuple(bg))
    c, r_out, r_in = size / 2, size * 0.4, size * 0.16
    points = [
        (
            c + (r_out if k % 2 == 0 else r_in) * math.sin(k * math.pi / 5),
            c - (r_out if k % 2 == 0 else r_in) * math.cos(k * math.pi / 5),
        )
        for k in range(10)
    ]
    ImageDraw.Draw(img).polygon(points, fill=tuple(fg))
    return img


def image_latents(base, image, generator: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents ``[1, C, h, w]`` of a PIL image resized to the UNet's native resolution."""
    side = base.unet.config.sample_size * base.vae_scale_factor
    pixels = torch.frombuffer(bytearray(image.convert("RGB").resize((side, side)).tobytes()), dtype=torch.uint8)
    pixels = pixels.view(side, side, 3).permute(2, 0, 1).float().div(127.5).sub(1.0).unsqueeze(0)
    vae = base.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.sample(generator=generator) * vae.config.scaling_factor


def run_cat_steps(
    base_path: str | Path,
    *,
    steps: int = 5,
    caption: str = "sks, a star on a plain background",
    trigger: str = "sks",
    image_path: str | Path | None = None,
    rank: int = 4,
    alpha: float = 4.0,
    cat_weight: float = 1.0,
    lr: float = 1e-4,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[StepRecord]:
    """Load ``base_path``, attach a fresh LoRA and take ``steps`` AdamW steps on the reference CAT loss.

    ``base_path``: a diffusers folder, or "demo" (the shipped demo model). With ``out``, the trained
    adapter is written there (atomically) in diffusers format; an existing ``out`` is refused before any
    work unless ``overwrite``, as is one that cannot be written. Returns one record per step.
    """

    if steps < 1:
        raise CatfastError(f"steps must be >= 1, got {steps}")
    if out is not None:  # refused before any work: an existing file, a folder, a link, an unwritable place
        check_output_file(out, overwrite, CatfastError)
    stripped = strip_trigger(caption, trigger)
    base = load_base(base_path)
    gen = torch.Generator().manual_seed(seed)
    if image_path is None:
        image = synthetic_image(256, seed)
    else:
        image = Image.open(image_path)
    z0 = image_latents(base, image, gen)
    cond, cond_stripped = base.encode_prompt([caption]), base.encode_prompt([stripped])
    unet = base.unet
    add_lora(unet, rank=rank, alpha=alpha, target_modules=DEFAULT_TARGETS)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    num_train_timesteps = base.scheduler.config.num_train_timesteps

    records = []
    bar = tqdm(range(1, steps + 1), desc="cat-step", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        noise = torch.randn(z0.shape, generator=gen)
        timesteps = torch.randint(0, num_train_timesteps, (1,), generator=gen)
        loss = cat_loss(
            unet,
            base.scheduler,
            latents=z0,
            noise=noise,
            timesteps=timesteps,
            cond=cond,
            cond_stripped=cond_stripped,
            cat_weight=cat_weight,
            mode="reference",
        )
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the LoRA parameters, not the frozen UNet
        optimizer.step()
        records.append(StepRecord(step, loss.total.item(), loss.ldm.item(), loss.cat.item(), time.perf_counter() - t0))
        bar.set_postfix(loss=f"{records[-1].loss:.4f}", ldm=f"{records[-1].ldm:.4f}", cat=f"{records[-1].cat:.2e}")
    if out is not None:
        write_adapter(extract_adapter(unet), out, format="diffusers", overwrite=overwrite)
    return records
