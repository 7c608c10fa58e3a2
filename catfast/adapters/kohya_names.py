"""kohya module names: a kohya/A1111 name stem (a module path with every "." written "_") back to a module
path, a path to its kohya stem, sd-scripts' SGM names of the SDXL UNet (``input_blocks_4_1_...``) in
diffusers' spelling, and BFL's FLUX.1 names (sd-scripts' FLUX LoRAs, ComfyUI's ``diffusion_model.``) as
diffusers' FluxTransformer2DModel layers (``split_flux_layer``). Used by ``catfast.adapters.formats``."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from catfast.adapters.adapter import LoraLayer, layer_key, split_key
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
    # diffusion transformers (musubi-tuner's kohya files keep diffusers' names): Flux, SD3, Qwen-Image
    "single_transformer_blocks", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context",
    "norm1_context", "proj_mlp", "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder",
    "guidance_embedder", "text_embedder", "norm_out", "pos_embed", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "img_in", "txt_in",
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


# BFL's FLUX.1 module names -> diffusers' FluxTransformer2DModel modules, as in diffusers'
# `_convert_sd_scripts_to_ai_toolkit` (lora_conversion_utils). Keys are written with "_" (kohya's stems; a
# dotted name is looked up the same way). A fused projection lists its modules in row order: a double
# block's qkv is q, k, v; a single block's linear1 is q, k, v and then the MLP's input (proj_mlp).
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
# BFL's final adaLN emits (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift): the up
# rows swap halves (diffusers' `swap_scale_shift`).
_FLUX_SWAPPED = "norm_out.linear"
_FLUX_BLOCK = re.compile(r"^(?P<kind>double_blocks|single_blocks)_(?P<i>\d+)_(?P<rest>.+)$")


# Names only BFL's FLUX.1 has ("img_in"/"txt_in" are also Qwen-Image's diffusers names, of other modules).
_BFL_ONLY = ("double_blocks_", "single_blocks_", "time_in_", "vector_in_", "guidance_in_", "final_layer_")


def is_bfl_flux(names: Iterable[str]) -> bool:
    """Whether module names (dotted or kohya stems) are BFL's FLUX.1 ones: any of them is a double/single
    block's, an embedder's or the final layer's."""
    return any(name.replace(".", "_").startswith(_BFL_ONLY) for name in names)


def flux_targets(name: str) -> tuple[str, ...] | None:
    """diffusers module paths of BFL FLUX.1 module ``name`` (``double_blocks.0.img_attn.qkv`` or kohya's
    ``double_blocks_0_img_attn_qkv``), several for a fused projection; None if ``name`` is no FLUX.1 name."""
    stem = name.replace(".", "_")
    if stem in _FLUX_TOP:
        return (_FLUX_TOP[stem],)
    m = _FLUX_BLOCK.match(stem)
    if m is None:
        return None
    table, block = (
        (_FLUX_DOUBLE, "transformer_blocks")
        if m["kind"] == "double_blocks"
        else (_FLUX_SINGLE, "single_transformer_blocks")
    )
    inner = table.get(m["rest"])
    return None if inner is None else tuple(f"{block}.{m['i']}.{t}" for t in inner)


def split_flux_layer(name: str, layer: LoraLayer) -> dict[str, LoraLayer]:
    """The diffusers-named layers equal to one LoRA layer on BFL FLUX.1 module ``name`` (see ``flux_targets``).

    A fused projection's update ``scale * up @ down`` is split by output rows: every part keeps the whole
    ``down`` and the alpha (so the same rank and scale) and gets its rows of ``up``; q, k and v are each
    as wide as the block's hidden size, which is ``down``'s input width (a single block's linear1 reads
    the hidden states), and proj_mlp gets the rest. Exact: no alpha is folded into the weights."""
    targets = flux_targets(name)
    if targets is None:
        raise AdapterFormatError(f"{name} is not a FLUX.1 module name")
    if layer.down.ndim != 2:
        raise AdapterFormatError(f"FLUX.1 layer {name}: down {tuple(layer.down.shape)} must be 2-D (linear)")
    up = layer.up
    if len(targets) == 1:
        if targets[0] == _FLUX_SWAPPED:
            shift, scale = up.chunk(2, dim=0)
            up = torch.cat([scale, shift])
        return {targets[0]: LoraLayer(down=layer.down, up=up, alpha=layer.alpha)}
    width, rows = layer.down.shape[1], up.shape[0]
    sizes = [width] * 3 + ([rows - 3 * width] if len(targets) == 4 else [])
    if sum(sizes) != rows or min(sizes) <= 0:
        raise AdapterFormatError(
            f"FLUX.1 layer {name}: up has {rows} rows, which do not split into {', '.join(targets)} "
            f"for hidden size {width}"
        )
    # clones: safetensors refuses to save tensors that share memory
    return {
        t: LoraLayer(down=layer.down.clone(), up=part.clone(), alpha=layer.alpha)
        for t, part in zip(targets, up.split(sizes), strict=True)
    }
