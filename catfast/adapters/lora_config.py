"""diffusers' ``lora_adapter_metadata`` (the peft LoraConfig of each component) both ways: reading it per
component and the alpha it gives a module, and the LoraConfig arguments that give every layer written its rank
and alpha."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from catfast.adapters.adapter import COMPONENTS, LoraLayer, most_common, pattern_value
from catfast.errors import AdapterFormatError

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_BARE = ""  # the component of keys (and LoraConfig metadata) written without a component prefix
PEFT_DEFAULT_ALPHA = 8  # LoraConfig().lora_alpha: what diffusers gets when metadata omits lora_alpha


def _lora_config_metadata(header: dict[str, str]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` JSON split per component: {"unet": {"r": 4, "lora_alpha": 8, ...}}.
    ``save_lora_weights`` prefixes the LoraConfig fields ("unet.r"); ``unet.save_lora_adapter`` does not
    (its keys are unprefixed too): those land under "" (_BARE)."""
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"metadata {LORA_ADAPTER_METADATA_KEY} is not valid JSON: {e}") from None
    if not isinstance(flat, dict):
        raise AdapterFormatError(f"metadata {LORA_ADAPTER_METADATA_KEY} must be a JSON object")
    per_component: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if component not in COMPONENTS or not field:
            component, field = _BARE, key
        per_component.setdefault(component, {})[field] = value
    return per_component


def _alpha_from_config(config: dict | None, path: str, rank: int) -> float:
    """The alpha peft gives module ``path`` under diffusers' LoraConfig metadata (None: alpha = rank)."""
    if not config:
        return float(rank)
    if config.get("use_dora"):
        raise AdapterFormatError("DoRA adapters (use_dora in lora_adapter_metadata) are not supported")
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", PEFT_DEFAULT_ALPHA)))
    # rsLoRA scales by alpha / sqrt(r); keep the same scale as alpha' / r.
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _config_path(component: str, path: str) -> str:
    # peft matches target names as suffixes, so the text encoders' "encoder.layers..." fits both the
    # flattened CLIPTextModel of transformers 5 and models that keep `text_model.`.
    return path.removeprefix("text_model.") if component.startswith("text_encoder") else path


def lora_config_kwargs(layers: Mapping[str, LoraLayer], *, anchored: bool = False) -> dict:
    """peft ``LoraConfig`` arguments that give every module path in ``layers`` its rank and alpha:
    the most common rank/alpha as defaults, the rest as exact (regex-escaped) rank/alpha patterns.
    ``anchored``: the paths are full module names from the model's root, and each pattern matches only
    its own module (``^`` + path), not every module whose name ends so."""
    start = "^" if anchored else ""
    ranks = {p: layer.rank for p, layer in layers.items()}
    alphas = {p: _plain(layer.alpha) for p, layer in layers.items()}
    r, lora_alpha = most_common(list(ranks.values())), most_common(list(alphas.values()))
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {start + re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {start + re.escape(p): v for p, v in alphas.items() if v != lora_alpha},
        "target_modules": sorted(layers),
    }


def _plain(alpha: float) -> float | int:
    return int(alpha) if float(alpha).is_integer() else alpha
