"""kohya module names: a kohya/A1111 name stem (a module path with every "." written "_") back to a module
path, a path to its kohya stem, and sd-scripts' SGM names of the SDXL UNet (``input_blocks_4_1_...``) to
diffusers' spelling. Used by ``catfast.adapters.formats`` to read and write kohya files."""

from __future__ import annotations

import re

import torch

from catfast.adapters.adapter import layer_key, split_key
from catfast.errors import AdapterFormatError

# Module-name components that contain "_": kohya replaces every "." by "_", so these are re-joined
# (longest first) when mapping a kohya name back. Checked against the Linear/Conv2d names of the
# tiny, SD1.5 and SDXL UNets and of CLIPTextModel / CLIPTextModelWithProjection (tests).
_MULTI_WORD = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding",
    "add_embedding", "linear_1", "linear_2", "encoder_hid_proj", "class_embedding", "conv_norm_out",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
}  # fmt: skip
_MAX_WORDS = max(name.count("_") + 1 for name in _MULTI_WORD)

# SGM (sd-scripts' SDXL UNet) names -> diffusers, for the parts outside input/middle/output blocks.
_SGM_FIXED = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj"}
_SGM_RESNET["skip_connection"] = "conv_shortcut"
_SGM_BLOCK = re.compile(r"^(?P<kind>input_blocks|output_blocks|middle_block)_(?P<i>\d+)_(?:(?P<j>\d+)_)?(?P<rest>.+)$")
SDXL_LAYERS_PER_BLOCK = 2


class KohyaResolver:
    """Maps kohya name stems of one component to module paths: by the model's real module names when
    a model is given, else by the naming rule (``kohya_to_path``)."""

    def __init__(self, component: str, model: torch.nn.Module | None):
        self.component = component
        self.layers_per_block = SDXL_LAYERS_PER_BLOCK
        self.known: dict[str, str] | None = None
        if model is not None:
            lpb = getattr(getattr(model, "config", None), "layers_per_block", None)
            self.layers_per_block = lpb if isinstance(lpb, int) else self.layers_per_block
            self.known = {}
            for name, module in model.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    path = split_key(layer_key(component, name))[1]
                    self.known[path.replace(".", "_")] = path

    def path(self, stem: str) -> str | None:
        if self.component == "unet":
            stem = sgm_to_diffusers_stem(stem, self.layers_per_block)
        if self.known is not None:
            return self.known.get(stem)
        return kohya_to_path(stem)


def kohya_to_path(stem: str) -> str:
    """Rule for a kohya name stem -> module path: split at "_" and re-join known multi-word names,
    longest first (``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``)."""
    words, parts, i = stem.split("_"), [], 0
    while i < len(words):
        for n in range(min(_MAX_WORDS, len(words) - i), 0, -1):
            candidate = "_".join(words[i : i + n])
            if n == 1 or candidate in _MULTI_WORD:
                parts.append(candidate)
                i += n
                break
    return ".".join(parts)


def path_to_kohya(component: str, path: str, *, sdxl_text_encoders: bool = False) -> str:
    """The kohya name stem (with prefix) of a module path: ``lora_unet_down_blocks_0_...``."""
    if component == "unet":
        prefix = "lora_unet_"
    elif component == "text_encoder":
        prefix = "lora_te1_" if sdxl_text_encoders else "lora_te_"
    else:
        prefix = "lora_te2_"
    return prefix + path.replace(".", "_")


def sgm_to_diffusers_stem(stem: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """An SGM/LDM UNet name stem (sd-scripts' SDXL: ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``)
    in diffusers spelling (``down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``); other stems
    pass through. ``layers_per_block`` is the UNet config's (2 for SDXL)."""
    if stem in _SGM_FIXED:
        return _SGM_FIXED[stem]
    m = _SGM_BLOCK.match(stem)
    if m is None:
        return stem
    kind, i, j, rest = m["kind"], int(m["i"]), m["j"], m["rest"]
    per_level = layers_per_block + 1
    if kind == "middle_block":
        if i not in (0, 1, 2) or j is not None:
            raise AdapterFormatError(f"SGM name {stem}: middle_block has children 0..2 (resnet, attention, resnet)")
        inner = "attentions_0" if i == 1 else f"resnets_{i // 2}"
        return f"mid_block_{inner}_{_sgm_inner(inner, rest)}"
    if j is None:
        raise AdapterFormatError(f"SGM name {stem} has no layer index after {kind}_{i}")
    j = int(j)
    if kind == "input_blocks":
        level, layer = divmod(i - 1, per_level)
        if rest == "op":
            return f"down_blocks_{level}_downsamplers_0_conv"
        inner = f"resnets_{layer}" if j == 0 else f"attentions_{layer}"
        return f"down_blocks_{level}_{inner}_{_sgm_inner(inner, rest)}"
    level, layer = divmod(i, per_level)
    if j == 2 or (j == 1 and rest == "conv"):
        return f"up_blocks_{level}_upsamplers_0_conv"
    inner = f"resnets_{layer}" if j == 0 else f"attentions_{layer}"
    return f"up_blocks_{level}_{inner}_{_sgm_inner(inner, rest)}"


def _sgm_inner(inner: str, rest: str) -> str:
    """Names inside an SGM ResBlock differ from diffusers' ResnetBlock2D; transformer names agree."""
    if inner.startswith("resnets"):
        if rest not in _SGM_RESNET:
            raise AdapterFormatError(f"SGM ResBlock layer {rest!r} has no diffusers counterpart")
        return _SGM_RESNET[rest]
    return rest
