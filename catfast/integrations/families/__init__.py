"""Model families (docs/design.md, "Model families"): the registry and ``family_of``.

One module per family (``unet``, ``flux``, ``sd3``, ``qwenimage``), each with a ``FAMILY`` object. A family
is found from a diffusers pipeline folder (``model_index.json``'s ``_class_name``, the key diffusers
dispatches pipelines on), a loaded pipeline, or a denoiser module."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from catfast.errors import ModelLoadError
from catfast.integrations.families.base import Cond, DenoiserFamily, FlowRecipe, SamplingRecipe, lora_disabled
from catfast.integrations.families.flux import FAMILY as FLUX
from catfast.integrations.families.qwenimage import FAMILY as QWENIMAGE
from catfast.integrations.families.sd3 import FAMILY as SD3
from catfast.integrations.families.unet import FAMILY as UNET

FAMILIES: dict[str, DenoiserFamily] = {f.name: f for f in (UNET, FLUX, SD3, QWENIMAGE)}

__all__ = [
    "Cond", "DenoiserFamily", "FAMILIES", "FlowRecipe", "SamplingRecipe", "family_named", "family_of", "lora_disabled",
]  # fmt: skip


def _supported() -> str:
    return ", ".join(f"{f.name} ({' / '.join(f.pipeline_classes)})" for f in FAMILIES.values())


def family_named(name: str) -> DenoiserFamily:
    """The family called ``name`` ("unet", "flux", "sd3", "qwenimage")."""
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model_or_folder) -> DenoiserFamily:
    """The family of a diffusers pipeline folder (a path), a loaded pipeline, or a denoiser module.
    Anything else raises ``ModelLoadError`` naming the class and the supported families (one line)."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        index = Path(model_or_folder) / "model_index.json"
        try:
            class_name = json.loads(index.read_text())["_class_name"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a diffusers pipeline folder ({type(e).__name__})") from None
        for family in FAMILIES.values():
            if class_name in family.pipeline_classes:
                return family
        raise ModelLoadError(f"{index}: pipeline class {class_name} is not supported; supported: {_supported()}")
    for key in ("transformer", "unet"):  # a pipeline: its denoiser decides
        denoiser = getattr(model_or_folder, key, None)
        if isinstance(denoiser, torch.nn.Module):
            return family_of(denoiser)
    class_name = type(model_or_folder).__name__
    for family in FAMILIES.values():
        if isinstance(model_or_folder, family.denoiser_type()):
            return family
    raise ModelLoadError(f"model class {class_name} is not supported; supported: {_supported()}")
