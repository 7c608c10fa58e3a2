"""LoRA safetensors files: detect, read and write the diffusers/peft and kohya formats.

Formats (``detect_format``):
  "peft"       ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (also ``transformer.`` for Flux, SD3 and
               Qwen-Image, ``text_encoder.``, ``text_encoder_2.``); alpha from the ``lora_adapter_metadata``
               JSON diffusers writes (``unet.lora_alpha``, ``transformer.alpha_pattern``, ...), else alpha =
               rank, as diffusers assumes. ai-toolkit's files are this format without alphas (its Flux
               files ``transformer.``, its newer ones ComfyUI's ``diffusion_model.``, read as
               ``transformer.``); keys without a prefix are the transformer's when their module path starts
               with a diffusion-transformer root (``transformer_blocks``, ``single_transformer_blocks``, ...),
               else the UNet's.
  "diffusers"  the older ``<path>.lora.down.weight`` / ``.lora.up.weight`` (and ``lora_linear_layer``,
               and ``attn1.processor.to_q_lora.down.weight``) that diffusers' training scripts still write.
  "kohya"      ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and
               ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for the text encoders; SDXL files in SGM
               names (``input_blocks_4_1_...``) are mapped to diffusers paths. sd-scripts' FLUX.1 files
               (BFL names: ``lora_unet_double_blocks_0_img_attn_qkv``, ``..._single_blocks_0_linear1``, and
               ComfyUI's ``diffusion_model.double_blocks.0...lora_down``) become transformer layers in
               diffusers' names, a fused qkv/linear1 split by rows (``kohya_names.split_flux_layer``);
               ``lora_unet_`` stems in diffusers' transformer names (musubi-tuner) are transformer layers.
               catfast does not call diffusers' ``_convert_kohya_flux_lora_to_diffusers``: it folds alpha
               into the weights, fixes linear1's split at FLUX.1's widths (3072, 12288), and (0.42.1)
               drops ``img_in``/``time_in``/``final_layer`` layers, whose keys it leaves without a
               ``transformer.`` prefix.

Alpha survives every read, write and conversion: ``write_adapter`` stores per-layer alphas in a form
diffusers' own ``load_lora_weights`` restores. Pure torch + safetensors (no diffusers, no peft).
Module names of kohya files: ``catfast.adapters.kohya_names``; diffusers' LoraConfig metadata (read and written):
``catfast.adapters.lora_config``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping

import safetensors
import safetensors.torch
import torch

from catfast.adapters.adapter import (
    COMPONENTS,
    DENOISERS,
    LoraAdapter,
    LoraLayer,
    layer_key,
    pair_problem,
    split_key,
)
from catfast.adapters.kohya_names import (
    KohyaResolver,
    flux_targets,
    is_bfl_flux,
    path_to_kohya,
    split_flux_layer,
)
from catfast.adapters.lora_config import (
    _BARE,
    LORA_ADAPTER_METADATA_KEY,
    _alpha_from_config,
    _config_path,
    _lora_config_metadata,
    lora_config_kwargs,
)
from catfast.errors import AdapterFormatError, CatfastError
from catfast.folders import write_atomic

FORMATS = ("peft", "diffusers", "kohya")
WRITE_FORMATS = ("diffusers", "kohya")  # "diffusers" writes the peft key style ("peft" is an alias)
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_KOHYA_PREFIXES["lora_te2_"] = "text_encoder_2"
# The first module name of every diffusion transformer's layer paths (Flux, SD3, Qwen-Image, diffusers'
# names); no UNet2DConditionModel module starts with one. Bare keys and kohya stems starting so are the
# transformer's.
DIT_ROOTS = (
    "transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder", "time_text_embed",
    "norm_out", "proj_out", "pos_embed", "img_in", "txt_in",
)  # fmt: skip
_DIT_STEM = re.compile(r"^(?:" + "|".join(DIT_ROOTS) + r")(?:_|$)")
_COMFY_PREFIX = "diffusion_model."  # ComfyUI's name of the denoiser: ai-toolkit's newer files, BFL-named Flux

# diffusers/peft keys: [component.]<path>.<role>.weight, and [component.]<path>.alpha.
_DIFFUSERS_ROLES = {
    "lora_A": "down",
    "lora_B": "up",
    "lora.down": "down",
    "lora.up": "up",
    "lora_linear_layer.down": "down",
    "lora_linear_layer.up": "up",
}
_PREFIX = r"^(?:(?P<component>" + "|".join(COMPONENTS) + r")\.)?"
_DIFFUSERS_KEY = re.compile(
    _PREFIX + r"(?P<path>.+)\.(?P<role>" + "|".join(map(re.escape, _DIFFUSERS_ROLES)) + r")\.weight$"
)
_PROCESSOR_KEY = re.compile(
    _PREFIX + r"(?P<path>.+?)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
_ALPHA_KEY = re.compile(_PREFIX + r"(?P<path>.+)\.alpha$")
_OLD_STYLE = re.compile(r"\.lora\.(down|up)\.|\.lora_linear_layer\.|_lora\.(down|up)\.")
# Oldest attention-processor names -> module names (the text encoder's CLIPAttention calls them q_proj ...).
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

_KOHYA_KEY = re.compile(
    r"^(?P<prefix>lora_(?:unet|te|te1|te2)_)(?P<stem>[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

_UNSUPPORTED = {
    "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "lora_B.bias": "LoRA with bias (lora_bias=True)",
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "oft_": "OFT",
}


# ----------------------------------------------------------------------------------------- detect


def detect_format(keys: Iterable[str]) -> str:
    """The format of a LoRA state dict from its keys: "kohya", "diffusers" (old ``lora.down`` or
    processor style, possibly mixed with ``lora_A``) or "peft".

    Raises AdapterFormatError when no key looks like LoRA."""
    keys = list(keys)
    if any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if any(k.startswith(_COMFY_PREFIX) and (".lora_down." in k or ".lora_up." in k) for k in keys):
        return "kohya"
    if any(_OLD_STYLE.search(k) for k in keys):
        return "diffusers"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise AdapterFormatError(
        f"no LoRA keys recognised (expected lora_A/lora_B, lora.down/up or kohya lora_unet_); {_few(keys)}"
    )


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "keys: " + ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------------- read


def read_adapter(path: str | os.PathLike, *, models: Mapping[str, torch.nn.Module] | None = None) -> LoraAdapter:
    """Read a LoRA safetensors file in any supported format (a folder: its ``pytorch_lora_weights.safetensors``).

    ``models`` ({"unet": unet, "text_encoder": te, ...}, optional): kohya names of those components
    are resolved against the models' real Linear/Conv2d module names (and SGM block numbers use the
    UNet's ``config.layers_per_block``) instead of the naming rule. Every problem raises
    AdapterFormatError naming the file: not safetensors (pickle is refused), corrupt or truncated,
    unknown keys, a layer missing one half, rank mismatch between down and up, a NaN/Inf weight or alpha.
    """
    source = os.fspath(path)
    if os.path.isdir(source):
        source = _weights_file(source)
    tensors, header = _load_safetensors(source)
    try:
        fmt = detect_format(tensors)
        if fmt == "kohya":
            layers = _parse_kohya(_comfy_to_kohya(tensors), models or {})
        else:
            layers = _parse_diffusers(tensors, _lora_config_metadata(header))
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{source}: {e}") from None
    metadata = {k: v for k, v in header.items() if k not in ("format", LORA_ADAPTER_METADATA_KEY)}
    # BFL's names are FLUX.1's alone, even where the diffusers names they become (to_q, ...) are every family's
    names = (k.removeprefix("lora_unet_").removeprefix(_COMFY_PREFIX).removeprefix("transformer.") for k in tensors)
    family = "flux" if is_bfl_flux(names) else None
    adapter = LoraAdapter(layers=layers, metadata=metadata, source_format=fmt, path=source, family=family)
    adapter.check_finite()
    return adapter


def _weights_file(folder: str) -> str:
    """The LoRA file of a folder diffusers saved into (``pytorch_lora_weights.safetensors``), or its only
    ``.safetensors`` file."""
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if DIFFUSERS_WEIGHT_NAME in found:
        return os.path.join(folder, DIFFUSERS_WEIGHT_NAME)
    if len(found) != 1:
        raise AdapterFormatError(f"{folder}: expected {DIFFUSERS_WEIGHT_NAME} or one .safetensors file, found {found}")
    return os.path.join(folder, found[0])


def _load_safetensors(source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(source):
        raise AdapterFormatError(f"{source}: no such file")
    with open(source, "rb") as f:
        head = f.read(9)  # safetensors: u64 little-endian header length, then the JSON header
    is_safetensors = len(head) == 9 and head[8:] == b"{"
    is_pickle = source.lower().endswith(_PICKLE_SUFFIXES) or head.startswith((b"PK\x03\x04", b"\x80"))
    if is_pickle and not is_safetensors:
        raise AdapterFormatError(
            f"{source}: looks like a pickle/torch.save checkpoint (.bin/.pt); catfast reads only .safetensors, "
            "because loading a pickle can run arbitrary code. Convert it where you trust the file, e.g. "
            "safetensors.torch.save_file(torch.load(src, weights_only=True), dst)"
        )
    try:
        with safetensors.safe_open(source, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, and OSError/ValueError from some corruptions
        raise AdapterFormatError(f"{source}: not a readable safetensors file (corrupt or truncated): {e}") from None
    if not tensors:
        raise AdapterFormatError(f"{source}: contains no tensors")
    return tensors, header


def _unsupported(keys: Iterable[str]) -> None:
    for key in keys:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise AdapterFormatError(f"{what} adapters are not supported (key {key})")


def _comfy_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's kohya-style keys (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``) in
    sd-scripts' spelling (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``), as diffusers reads them."""
    out = {}
    for key, tensor in tensors.items():
        if key.startswith(_COMFY_PREFIX):
            name, dot, role = key[len(_COMFY_PREFIX) :].partition(".lora_")
            if not dot:
                name, dot, role = key[len(_COMFY_PREFIX) :].rpartition(".")
            key = "lora_unet_" + name.replace(".", "_") + dot + role
        out[key] = tensor
    return out


def _bare_component(path: str, bfl: bool) -> str:
    """The denoiser a path without component prefix belongs to (see DIT_ROOTS; ``bfl``: the file names
    FLUX.1's modules in BFL's names)."""
    is_dit = path.split(".", 1)[0] in DIT_ROOTS or (bfl and flux_targets(path) is not None)
    return "transformer" if is_dit else "unet"


def _parse_diffusers(tensors: dict[str, torch.Tensor], configs: dict[str, dict]) -> dict[str, LoraLayer]:
    """Layers of a peft/diffusers-style state dict. Keys without a component prefix (_BARE while
    parsing) are the transformer's or the UNet's (``_bare_component``); ``diffusion_model.`` is
    ``transformer.``; transformer layers in BFL FLUX.1 names are split into diffusers' modules."""
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], float] = {}
    unknown = []
    _unsupported(tensors)
    for key, tensor in tensors.items():
        key_ = key.replace(".processor.", ".")
        if key_.startswith(_COMFY_PREFIX):
            key_ = "transformer." + key_[len(_COMFY_PREFIX) :]
        if m := _PROCESSOR_KEY.match(key_):
            component = m["component"] or _BARE
            names = _PROCESSOR_TEXT if component.startswith("text_encoder") else _PROCESSOR_UNET
            where, role = (component, f"{m['path']}.{names[m['proj']]}"), m["role"]
        elif m := _DIFFUSERS_KEY.match(key_):
            where, role = (m["component"] or _BARE, m["path"]), _DIFFUSERS_ROLES[m["role"]]
        elif (m := _ALPHA_KEY.match(key_)) and tensor.numel() == 1:
            alphas[(m["component"] or _BARE, m["path"])] = float(tensor.item())
            continue
        else:
            unknown.append(key)
            continue
        halves.setdefault(where, {})[role] = tensor
    if unknown:
        raise AdapterFormatError(f"unknown keys in a {detect_format(tensors)} LoRA file: {_few(unknown)}")
    stray = set(alphas) - set(halves)
    if stray:
        raise AdapterFormatError(f"alpha without LoRA weights for {', '.join(sorted(p for _, p in stray))}")

    bfl = is_bfl_flux(p for c, p in halves if c in ("transformer", _BARE))
    layers = {}
    for (component, path), pair in halves.items():
        owner = component or _bare_component(path, bfl)
        down, up = _pair(f"{owner}.{path}", pair)
        alpha = alphas.get((component, path))
        if alpha is None:
            config = configs.get(component) or (configs.get(owner) if component == _BARE else None)
            alpha = _alpha_from_config(config, path, down.shape[0])
        layer = LoraLayer(down=down, up=up, alpha=alpha)
        if owner == "transformer" and bfl and flux_targets(path) is not None:
            _add_layers(layers, "transformer", split_flux_layer(path, layer))
        else:
            _add_layers(layers, owner, {path: layer})
    return layers


def _add_layers(layers: dict[str, LoraLayer], component: str, new: dict[str, LoraLayer]) -> None:
    for path, layer in new.items():
        key = layer_key(component, path)
        if key in layers:  # e.g. a FLUX.1 qkv and a to_q of the same block, or bare and prefixed keys
            raise AdapterFormatError(f"two LoRA layers for module {key}")
        layers[key] = layer


def _pair(name: str, pair: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if "down" not in pair or "up" not in pair:
        have, missing = ("down", "up") if "down" in pair else ("up", "down")
        raise AdapterFormatError(f"layer {name} has {have} weights but no {missing} weights")
    problem = pair_problem(pair["down"], pair["up"])
    if problem:
        raise AdapterFormatError(f"layer {name}: {problem}")
    return pair["down"], pair["up"]


def _parse_kohya(tensors: dict[str, torch.Tensor], models: Mapping[str, torch.nn.Module]) -> dict[str, LoraLayer]:
    """Layers of a kohya/A1111 state dict; alpha defaults to the rank when a layer has no ``.alpha``."""
    _unsupported(tensors)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        groups.setdefault((_KOHYA_PREFIXES[m["prefix"]], m["stem"]), {})[_KOHYA_ROLES[m["role"]]] = tensor
    if unknown:
        raise AdapterFormatError(f"unknown keys in a kohya LoRA file: {_few(unknown)}")

    if any(stem.startswith("joint_blocks_") for _, stem in groups):
        raise AdapterFormatError(
            "sd-scripts' SD3 names (lora_unet_joint_blocks_...) are not supported; "
            "diffusers' names (lora_unet_transformer_blocks_...) are"
        )
    bfl = is_bfl_flux(stem for c, stem in groups if c == "unet")
    groups = {(_kohya_component(c, stem, bfl), stem): group for (c, stem), group in groups.items()}
    if len({c for c, _ in groups} & set(DENOISERS)) > 1:
        raise AdapterFormatError("lora_unet_ layers name both UNet and diffusion-transformer modules")
    resolvers = {c: KohyaResolver(c, models.get(c)) for c in {c for c, _ in groups}}
    layers, unresolved = {}, []
    for (component, stem), group in groups.items():
        name = f"{component}:{stem}"
        if "alpha" in group and "down" not in group and "up" not in group:
            raise AdapterFormatError(f"layer {name} has an alpha but no LoRA weights")
        down, up = _pair(name, group)
        alpha = float(group["alpha"].item()) if "alpha" in group else float(down.shape[0])
        layer = LoraLayer(down=down, up=up, alpha=alpha)
        if component == "transformer" and bfl and flux_targets(stem) is not None:
            _add_layers(layers, component, split_flux_layer(stem, layer))
            continue
        path = resolvers[component].path(stem)
        if path is None:
            unresolved.append(stem)
            continue
        _add_layers(layers, component, {path: layer})
    if unresolved:
        raise AdapterFormatError(
            f"kohya layers that match no Linear/Conv2d module of the given model: {_few(unresolved)}"
        )
    return layers


def _kohya_component(component: str, stem: str, bfl: bool) -> str:
    """A ``lora_unet_`` stem in BFL FLUX.1 names (``bfl``: the file uses them) or starting with a
    diffusion-transformer root is the transformer's (sd-scripts and musubi-tuner use ``lora_unet_`` for
    every denoiser)."""
    if component == "unet" and ((bfl and flux_targets(stem) is not None) or _DIT_STEM.match(stem)):
        return "transformer"
    return component


# ------------------------------------------------------------------------------------------ write


def write_adapter(
    adapter: LoraAdapter, path: str | os.PathLike, format: str = "diffusers", *, overwrite: bool = False
) -> None:
    """Write ``adapter`` as safetensors, atomically (temp file in the same folder, fsync, os.replace).

    "diffusers" (alias "peft"): peft keys (``unet.<path>.lora_A.weight``) plus diffusers'
    ``lora_adapter_metadata`` JSON (r, lora_alpha, rank_pattern, alpha_pattern, target_modules per
    component), which ``pipe.load_lora_weights`` turns into the LoraConfig: rank and alpha restored.
    "kohya": ``lora_unet_...lora_down.weight`` / ``lora_up.weight`` / ``.alpha`` per layer; UNet and
    text-encoder adapters only (CatfastError for transformer layers: sd-scripts' FLUX.1 names fuse q, k, v
    into one layer, which catfast does not write).
    Tensor dtypes are kept; alphas are stored in float32 (kohya) or JSON.
    """
    format = "diffusers" if format == "peft" else format
    if format not in WRITE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(WRITE_FORMATS)}, got {format!r}")
    dest = os.fspath(path)
    if os.path.exists(dest) and not overwrite:
        raise CatfastError(f"{dest} exists (pass --overwrite to replace it)")
    if not adapter.layers:
        raise AdapterFormatError(f"{adapter.where()}: adapter has no layers to write")
    if format == "kohya" and adapter.component("transformer"):
        raise CatfastError(
            f"{adapter.where()}: catfast writes kohya files for UNet and text-encoder adapters only, "
            "not for a diffusion transformer's (Flux, SD3, Qwen-Image); write format 'diffusers' "
            "(transformer.<module>.lora_A/lora_B keys, which diffusers' load_lora_weights reads)"
        )
    tensors, lora_metadata = _kohya_state_dict(adapter) if format == "kohya" else _peft_state_dict(adapter)
    metadata = {**{str(k): str(v) for k, v in adapter.metadata.items()}, "format": "pt"}
    if lora_metadata:
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(lora_metadata, indent=2, sort_keys=True)
    write_atomic(dest, safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata))


def _peft_state_dict(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, lora_metadata = {}, {}
    for component in adapter.components():
        layers = adapter.component(component)
        for path, layer in layers.items():
            tensors[f"{component}.{path}.lora_A.weight"] = layer.down.contiguous()
            tensors[f"{component}.{path}.lora_B.weight"] = layer.up.contiguous()
        # a denoiser's paths are full module names: anchored, so that the top-level proj_out's rank and alpha
        # are not also single_transformer_blocks.N.proj_out's (peft's patterns match name suffixes)
        config = lora_config_kwargs(
            {_config_path(component, p): v for p, v in layers.items()}, anchored=component in DENOISERS
        )
        lora_metadata.update({f"{component}.{k}": v for k, v in config.items()})
    return tensors, lora_metadata


def _kohya_state_dict(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict]:
    sdxl = "text_encoder_2" in adapter.components()
    tensors = {}
    for key, layer in adapter.layers.items():
        name = path_to_kohya(*split_key(key), sdxl_text_encoders=sdxl)
        tensors[f"{name}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors, {}
