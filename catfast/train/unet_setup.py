"""The UNet trainer's setup (``trainer.py``): the latent cache every rank reads, the LoRA adapters attached with
their trainable parameters, and whether the run times both CAT step modes over its first steps."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from catfast.integrations.peft_adapters import add_lora
from catfast.train.cache import build_cache
from catfast.train.config import TrainConfig
from catfast.train.dist import Dist
from catfast.train.run_parts import transform_for


def _build_dataset(base, examples, config: TrainConfig, out: Path, device, dist: Dist, progress: bool):
    """The cached latents and text embeddings. Rank 0 encodes what is missing first; the other ranks then
    find every entry in the cache (no two processes write one entry). Encoded in fp32 whatever the
    mixed precision (the entries are shared by runs of either); the trainer casts per batch."""
    resolution = config.resolution or base.unet.config.sample_size * base.vae_scale_factor
    transform = transform_for(config, resolution)
    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
    dataset = None
    if dist.main:
        dataset = build_cache(base, examples, transform, cache_dir, device=device, progress=progress)
    dist.barrier()
    if not dist.main:
        dataset = build_cache(base, examples, transform, cache_dir, device=device, progress=False)
    return dataset


def _add_adapters(unet, config: TrainConfig) -> tuple[list[str], dict[str, torch.nn.Parameter]]:
    """Attach the LoRA adapter(s); returns their names and the trainable parameters by name (sorted)."""
    count = len(config.concepts) if config.concept_adapters == "per-concept" else 1
    names = ["default"] if count == 1 else [f"concept{i}" for i in range(count)]
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in names:
            add_lora(unet, rank=config.rank, alpha=config.lora_alpha, target_modules=config.targets, adapter_name=name)
    if len(names) > 1:
        unet.set_adapter(names)
    pattern = re.compile(r"\.lora_[AB]\.(" + "|".join(map(re.escape, names)) + r")\.weight$")
    params = {n: p for n, p in sorted(unet.named_parameters()) if pattern.search(n)}
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return names, params


def _measures(mode: str, device: torch.device, world: int) -> bool:
    """Whether the run times both CAT step modes over its first steps (``ModeTrial``): ``measure`` asks for it;
    ``auto`` does it on a GPU in one process (ranks timing apart could pick different modes)."""
    return mode == "measure" or (mode == "auto" and device.type == "cuda" and world == 1)


def empty_caption_row(base):
    """The empty caption's condition as one cached row (CPU, fp32, no batch axis): a ``[L, D]`` tensor, or SDXL's
    dict with its pooled ``text_embeds`` (``time_ids`` come from each sample): what caption dropout puts in place
    of a sample's trigger caption."""
    side = base.unet.config.sample_size * base.vae_scale_factor
    cond = base.encode_prompt([""], image_size=(side, side) if base.is_sdxl else None)
    if not isinstance(cond, dict):
        return cond[0].float().cpu()
    pooled = cond["added_cond_kwargs"]["text_embeds"][0].float().cpu()
    return {"encoder_hidden_states": cond["encoder_hidden_states"][0].float().cpu(),
            "added_cond_kwargs": {"text_embeds": pooled}}  # fmt: skip
