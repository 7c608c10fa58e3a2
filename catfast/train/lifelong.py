"""Kept adapters for lifelong training (`catfast train --keep A.safetensors[,B...]`; docs/retention.md).

Design: the new adapter is trained to leave the kept ones working when the adapters are stacked (served
together), not merged into one adapter. The kept adapters are merged into the frozen base weights for the
run (``W += s * up @ down``), so every "base" row of the row-planned call is base + kept adapters (the
model the user has before the new concept), and the new adapter's rows are base + kept + new (the model
after). Each kept adapter records the prompts it was trained on (``TRIGGER_PROMPTS`` in its metadata,
written by `catfast train`); they are the distillation prompts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from catfast.errors import CatfastError

TRIGGER_PROMPTS = "catfast.trigger_prompts"  # adapter metadata: JSON list of the captions (with trigger) it learned
MAX_TRIGGER_PROMPTS = 64  # at most this many distinct captions are recorded per adapter


class KeepError(CatfastError):
    """A kept adapter cannot be used: unreadable, made for another base, or without trigger prompts."""


@dataclass
class KeptAdapter:
    """One kept adapter file, its parsed layers and its recorded trigger prompts."""

    path: Path
    adapter: object  # catfast.adapters.adapter.LoraAdapter
    prompts: list[str]


def trigger_prompts_metadata(captions: list[str]) -> str:
    """The metadata value recording ``captions`` (distinct, in first-seen order, at most
    ``MAX_TRIGGER_PROMPTS``)."""
    return json.dumps(list(dict.fromkeys(captions))[:MAX_TRIGGER_PROMPTS])


def read_kept(paths: list[str | os.PathLike], unet, component: str = "unet") -> list[KeptAdapter]:
    """Read and check every kept adapter against the denoiser ``unet`` (``component`` "unet", or "transformer"
    for a DiT) before anything changes: the file must parse, every layer must fit (AdapterShapeError names the
    file, layer and shapes), and its metadata must record trigger prompts. KeepError names the file and what
    is missing. ``unet`` None: no shape check here (``merge_kept`` checks every layer before it changes any)."""
    from catfast.adapters.formats import read_adapter
    from catfast.adapters.merge import resolve_targets

    kept, seen = [], set()
    for raw in paths:
        path = Path(raw)
        if path.resolve() in seen:
            raise KeepError(f"{path}: given twice in --keep")
        seen.add(path.resolve())
        if not path.is_file():
            raise KeepError(f"{path}: kept adapter not found")
        adapter = read_adapter(path, models={component: unet} if unet is not None else None)
        if adapter.components() != [component]:
            raise KeepError(
                f"{path}: kept adapters must hold {component} layers only; this one has {adapter.components()}"
            )
        if unet is not None:
            resolve_targets(unet, adapter, component)  # shape check, before any merge
        raw_prompts = adapter.metadata.get(TRIGGER_PROMPTS)
        if raw_prompts is None:
            raise KeepError(
                f"{path}: no recorded trigger prompts ({TRIGGER_PROMPTS} metadata; adapters trained by "
                "`catfast train` since it records them have it): cannot distill this adapter without them"
            )
        try:
            prompts = json.loads(raw_prompts)
        except ValueError:
            prompts = None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise KeepError(f"{path}: its {TRIGGER_PROMPTS} metadata is not a non-empty list of prompts")
        kept.append(KeptAdapter(path, adapter, prompts))
    return kept


def merge_kept(unet, kept: list[KeptAdapter], component: str = "unet") -> None:
    """Merge every kept adapter into the denoiser's frozen weights (in place; all were checked by `read_kept`)."""
    import torch

    from catfast.adapters.merge import merge_adapter_

    with torch.no_grad():  # a DiT's transformer is merged before its LoRA is attached, its weights still trainable
        for k in kept:
            merge_adapter_(unet, k.adapter, component)
