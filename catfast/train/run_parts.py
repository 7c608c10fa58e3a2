"""What both trainers share (the UNet loop, ``train.trainer``, and the flow-matching DiT loop,
``train.flow_trainer``): the run's result, its device and seeding, the concept scan and restoring LoRA
weights from a checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from catfast.errors import CatfastError
from catfast.train.config import TrainConfig
from catfast.train.data import Concept, scan_concepts
from catfast.train.dist import Dist
from catfast.train.transform import Transform

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a run did. ``adapters``: trigger -> adapter file (rank 0; empty on other ranks). ``lora``:
    the final trainable parameters by name (CPU copies, on every rank). ``steps_per_second``: optimizer
    steps per second of training, after the first step and without sampling and checkpoint time."""

    out: Path
    adapters: dict[str, Path]
    steps: int
    start_step: int
    seconds: float
    steps_per_second: float | None
    last: dict[str, float]
    mode: str = "reference"  # the CAT step mode that ran (config.mode, or what "auto" chose)
    mode_reason: str = ""
    lora: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def device_for(config: TrainConfig, dist: Dist) -> torch.device:
    """The run's device: ``config.device`` ("auto": CUDA when torch sees it), this process's GPU under DDP."""
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CatfastError("device = cuda, but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's and numpy's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def scan_examples(config: TrainConfig):
    """The training examples of every concept folder (``train.data.scan_concepts``); none is an error."""
    concepts = [Concept(Path(c.data), c.trigger) for c in config.concepts]
    examples = scan_concepts(concepts, prepend_trigger=config.prepend_trigger, on_bad_image=config.on_bad_image)
    if not examples:
        raise CatfastError(f"no training images in {', '.join(c.data for c in config.concepts)}")
    return examples


def load_lora(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a checkpoint's LoRA tensors ``saved`` into the run's ``params`` (the same names, or an error)."""
    if set(saved) != set(params):
        raise CatfastError(f"{where}: the checkpoint's LoRA parameters do not match this run's adapters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def transform_for(config: TrainConfig, resolution: int) -> Transform:
    """The run's image transform at ``resolution`` px: the config's crops, flips and buckets (one crop variant
    with center cropping)."""
    return Transform(
        resolution=resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        buckets=config.buckets,
        crop_variants=1 if config.center_crop else config.crop_variants,
        allow_upscale=config.allow_upscale,
    )
