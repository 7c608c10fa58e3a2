"""Checkpoint weights into diffusers models: reading one weights file (safetensors, or a pickle only when
allowed), fitting a file of UNet weights to its config, and building the UNet, VAE and text encoders of a
single-file checkpoint in the original (LDM) layout with diffusers' own converters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from catfast.errors import ModelLoadError
from catfast.integrations.families.unet import FAMILY as UNET

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
_SD2_TEXT_PREFIX = "cond_stage_model.model."


# ---------------------------------------------------------------------------------------------------------
# single UNet files


def _unet_config(config: str | os.PathLike | dict) -> tuple[dict, str]:
    """(UNet config dict, where it came from) from a dict, a config.json, a unet/ folder or a diffusers folder."""
    if isinstance(config, dict):
        return dict(config), "the given config"
    src = Path(config)
    for candidate in (src, src / "config.json", src / "unet" / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), str(candidate)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{candidate}: not readable JSON: {e}") from None
    raise ModelLoadError(f"{src}: no UNet config here (expected a config.json, a unet/ folder or a diffusers folder)")


def _read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of one weights file: safetensors, or (only with allow_pickle) a torch pickle read with
    weights_only=True. A Lightning-style {"state_dict": {...}} wrapper is unwrapped; non-tensors dropped."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from None
    if suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown weights format {suffix!r}; expected .safetensors")
    if not allow_pickle:
        raise ModelLoadError(
            f"{path}: refusing to load a pickle checkpoint ({suffix}): unpickling can run arbitrary code. "
            "Convert it to .safetensors, or (from Python) pass allow_pickle=True to load it with "
            "torch.load(weights_only=True), which accepts only tensors and plain containers."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load pickle checkpoint with weights_only=True: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _fit_problems(got: dict[str, torch.Tensor], want: dict[str, torch.Size]) -> str | None:
    """None if `got` has exactly the keys and shapes of `want`; else a short report of what differs."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [k for k in want if k in got and tuple(got[k].shape) != tuple(want[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        k = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(got[k].shape)} vs model {tuple(want[k])})"
        )
    return "; ".join(problems) or None


def load_unet_file(
    path: str | os.PathLike,
    config: str | os.PathLike | dict,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A UNet2DConditionModel from ONE weights file plus a local config (a config.json, a unet/ folder, a
    diffusers folder, or a config dict). The file may use diffusers naming or the original LDM/SD naming
    (`model.diffusion_model.*`, e.g. a full SD checkpoint; its VAE/text keys are ignored), which is
    converted with diffusers' own `convert_ldm_unet_checkpoint`. Pickle formats (.ckpt/.pt/.pth/.bin) are
    refused unless allow_pickle. The file's tensors become the parameters (no second copy when the file
    already has `dtype`). Keys and shapes must fit the config exactly, else ModelLoadError."""
    path = Path(path)
    cfg, cfg_src = _unet_config(config)
    state = _read_state_dict(path, allow_pickle)
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # lazy: diffusers

        try:
            state = convert_ldm_unet_checkpoint(state, cfg)
        except Exception as e:
            raise ModelLoadError(
                f"{path}: LDM UNet weights do not fit the config from {cfg_src}: {type(e).__name__}: {e}"
            ) from None
        state = {k: v for k, v in state.items() if v is not None}
    with torch.device("meta"):
        unet = UNET.denoiser_type().from_config(cfg)
    problems = _fit_problems(state, {k: v.shape for k, v in unet.state_dict().items()})
    if problems:
        raise ModelLoadError(f"{path}: UNet weights do not fit the config from {cfg_src}: {problems}")
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.to(dtype)


# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# single-file checkpoints (A1111 / civitai): what a file holds, and its components


def single_file_kind(keys) -> str:
    """What a single weights file holds, by its keys: ``"sd15"`` / ``"sdxl"`` (a whole SD1.x / SDXL checkpoint
    in the original layout), ``"sd2"`` (SD2.x, OpenCLIP-H text encoder) or ``"unet"`` (UNet weights only,
    original or diffusers naming)."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not (has(LDM_UNET_PREFIX) and has(LDM_VAE_PREFIX)):
        return "unet"
    if has(SDXL_TEXT_PREFIXES[1]):
        return "sdxl"
    if has(SD1_TEXT_PREFIX):
        return "sd15"
    return "sd2" if has(_SD2_TEXT_PREFIX) else "unet"


def _component_config(folder: Path, name: str) -> dict:
    file = folder / name / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: no readable {name} config: {e}") from None


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, what: str, dtype: torch.dtype):
    """``model`` with ``state`` as its weights: exactly its keys and shapes, else ModelLoadError naming them."""
    problems = _fit_problems(state, {k: v.shape for k, v in model.state_dict().items()})
    if problems:
        raise ModelLoadError(f"{where}: the {what} weights do not fit its config: {problems}")
    model.load_state_dict(state, strict=True, assign=True)
    return torch.nn.Module.to(model, dtype)  # not diffusers' .to, which warns about casts it cannot check


def _unet_from_state(state: dict, cfg: dict, where: str, dtype: torch.dtype):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # lazy: diffusers

    try:
        converted = {k: v for k, v in convert_ldm_unet_checkpoint(state, cfg).items() if v is not None}
    except Exception as e:  # diffusers' converter raises KeyError/IndexError/... on a layout it does not expect
        raise ModelLoadError(f"{where}: the UNet weights do not fit its config: {type(e).__name__}: {e}") from None
    with torch.device("meta"):
        unet = UNET.denoiser_type().from_config(cfg)
    return _assign(unet, converted, where, "UNet", dtype)


def _vae_from_state(state: dict, folder: Path, where: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL  # lazy: diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # lazy: diffusers

    cfg = _component_config(folder, "vae")
    try:
        converted = convert_ldm_vae_checkpoint(state, cfg)
    except Exception as e:
        raise ModelLoadError(f"{where}: the VAE weights do not fit its config: {type(e).__name__}: {e}") from None
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    return _assign(vae, converted, where, "VAE", dtype)


def _text_encoder_from_state(state: dict, folder: Path, name: str, kind: str, where: str, dtype: torch.dtype):
    """A text encoder of the file, by diffusers' converters: CLIP's layout (SD1.x, SDXL's first) or OpenCLIP's
    (SDXL's second; SD2.x's). Built on the CPU (its position ids are a buffer the file does not hold)."""
    from diffusers.loaders.single_file_utils import (  # lazy: diffusers
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # lazy: transformers

    try:
        config = CLIPTextConfig.from_pretrained(folder / name, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{folder / name}: no readable {name} config: {type(e).__name__}: {e}") from None
    with torch.device("meta" if next(iter(state.values())).is_meta else "cpu"):
        model = (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(config)
    if name == "text_encoder" and kind != "sd2":
        prefix = SD1_TEXT_PREFIX if kind == "sd15" else SDXL_TEXT_PREFIXES[0]
        mine = {k: v for k, v in state.items() if k.startswith(prefix)}
        converted = convert_ldm_clip_checkpoint(mine)
    else:
        prefix = _SD2_TEXT_PREFIX if kind == "sd2" else SDXL_TEXT_PREFIXES[1]
        converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    wants_wrapper = any(k.startswith("text_model.") for k in model.state_dict())
    converted = {
        ("text_model." + k if wants_wrapper and not k.startswith(("text_model.", "text_projection")) else k)
        if wants_wrapper
        else k.removeprefix("text_model."): v
        for k, v in converted.items()
        if not k.endswith("position_ids")  # a buffer transformers makes itself; some files carry it
    }
    if not converted:
        raise ModelLoadError(f"{where}: no {name} weights (keys under {prefix})")
    return _assign(model, converted, where, name, dtype)
