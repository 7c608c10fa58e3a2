"""Base models: the `BaseModel` bundle, prompt encoding, and loaders for local diffusers folders and
single UNet weight files (diffusers or original LDM/SD naming). Nothing here touches the hub.

What `--base` accepts (`resolve_base`, and `load_base` for every command):
- a diffusers folder (model_index.json + unet/ text_encoder/ tokenizer/ vae/ scheduler/, and
  text_encoder_2/ tokenizer_2/ for SDXL), e.g. one written by `catfast models init`;
- a single-file SD1.x or SDXL checkpoint as A1111 / civitai share them (`.safetensors`; pickle formats
  only with allow_pickle): the original (non-diffusers) key layout, UNet under ``model.diffusion_model.``,
  VAE under ``first_stage_model.``, text encoder(s) under ``cond_stage_model.transformer.`` (SD1.x) or
  ``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.`` (SDXL, the second in
  OpenCLIP's layout). Every component comes from the file, converted with diffusers' own single-file
  converters; the configs are the ones shipped in ``single_file/`` (SD1.5's and SDXL-base's, with real
  CLIP's tokenizer built from its shipped merges), or those of ``config=`` a diffusers folder (its
  tokenizers too) for a fine-tune of another shape. `load_single_file`;
- a file of UNet weights only (either naming) together with ``config=`` a diffusers folder: the file
  replaces that folder's UNet weights, and the folder supplies the UNet config, text encoders,
  tokenizers, VAE and scheduler.
Reading a weights file and converting its components are `weight_files.py`'s job.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catfast.errors import ModelLoadError
from catfast.integrations.families.unet import FAMILY as UNET
from catfast.integrations.weight_files import (
    LDM_UNET_PREFIX,
    _read_state_dict,
    _text_encoder_from_state,
    _unet_config,
    _unet_from_state,
    _vae_from_state,
    load_unet_file,
    single_file_kind,
)
from catfast.shipped import check_assets, dit_model_path, model_path


@dataclass
class BaseModel:
    """A Stable Diffusion (1.x/2.x-style) or SDXL base: every component a training or sampling run needs.
    `scheduler` is a DDPMScheduler carrying the training noise schedule. `path` is the folder it came from
    (None when built in memory); `unet_file` the single UNet file that replaced the folder's UNet, if any."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    path: Path | None = None
    unet_file: Path | None = None
    file: Path | None = None  # the single-file checkpoint every component came from (`load_single_file`)

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL-style bases (two text encoders, added text/time conditioning)."""
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD, 2 for the tiny factory VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompt(self, prompts: list[str], *, image_size: tuple[int, int] | None = None):
        """See `encode_prompt`."""
        return encode_prompt(self, prompts, image_size=image_size)


def diffusers_pipeline(base: BaseModel):
    """diffusers' own StableDiffusionPipeline (or StableDiffusionXLPipeline for an SDXL base) over
    ``base``'s components (shared, not copied), with a DDIM scheduler built from the base's config and the
    progress bar off: the oracle catfast's sampler and serving engine are checked against, and the
    baseline of the serving benchmark."""
    from diffusers import DDIMScheduler  # lazy: diffusers

    parts = dict(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=DDIMScheduler.from_config(base.scheduler.config),
    )
    pipeline = UNET.pipeline_type(xl=base.is_sdxl)
    if base.is_sdxl:
        pipe = pipeline(**parts, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
    else:
        no_safety_checker = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = pipeline(**parts, **no_safety_checker)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tokens(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """(B, L) token ids, padded/truncated to the tokenizer's model_max_length (77)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


@torch.no_grad()
def encode_prompt(base: BaseModel, prompts: list[str], *, image_size: tuple[int, int] | None = None):
    """Text conditioning for the UNet, without gradients (catfast's text encoders are frozen).

    SD: returns encoder_hidden_states, a (B, 77, D) tensor (the text encoder's last hidden state; D = 768
    for SD1.5, 32 for tiny), in the text encoder's dtype and device.
    SDXL: returns a dict {"encoder_hidden_states": (B, 77, D1 + D2) — the penultimate hidden states of both
    encoders concatenated (2048 for SDXL), "added_cond_kwargs": {"text_embeds": (B, P) pooled projection of
    text_encoder_2 (1280), "time_ids": (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)}},
    with image_size = (h, w) in pixels (default: the UNet's native size). `unet(z, t, **cond)` accepts it.
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompt takes a list of prompts, not one string")
    encoder = base.text_encoder
    ids = _tokens(base.tokenizer, prompts, encoder.device)
    if not base.is_sdxl:
        return encoder(ids)[0]
    out_1 = encoder(ids, output_hidden_states=True)
    encoder_2 = base.text_encoder_2
    out_2 = encoder_2(_tokens(base.tokenizer_2, prompts, encoder_2.device), output_hidden_states=True)
    hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2].to(out_1.hidden_states[-2])], dim=-1)
    if image_size is None:
        side = base.unet.config.sample_size * base.vae_scale_factor
        image_size = (side, side)
    h, w = image_size
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=hidden.device).repeat(len(prompts), 1)
    pooled = out_2.text_embeds.to(hidden)
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


# ---------------------------------------------------------------------------------------------------------
# diffusers folders

_REQUIRED = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")


def _read_model_index(folder: Path) -> dict[str, list]:
    """The components (name -> [library, class]) model_index.json names, after checking the folder and
    that each of them has its subfolder."""
    if not folder.exists():
        raise ModelLoadError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a diffusers folder (model_index.json and one subfolder per component)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder}: not a diffusers folder: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{index_file}: not readable JSON: {e}") from None
    components = {
        k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1]
    }
    required = _REQUIRED + (("text_encoder_2", "tokenizer_2") if "text_encoder_2" in components else ())
    for name in required:
        if name not in components:
            raise ModelLoadError(f"{folder}: model_index.json names no {name!r} component")
        if not (folder / name).is_dir():
            raise ModelLoadError(f"{folder}: component {name!r} is missing: no {name}/ subfolder")
    return {name: components[name] for name in required}


def _load_component(folder: Path, name: str, dtype: torch.dtype):
    """One component from `folder/name`, local files only; any failure becomes a ModelLoadError."""
    from diffusers import AutoencoderKL, DDPMScheduler  # lazy: diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # lazy: transformers

    sub = folder / name
    try:
        if name.startswith("tokenizer"):
            return CLIPTokenizer.from_pretrained(sub, local_files_only=True)
        if name == "scheduler":  # the training schedule, whatever sampler class the folder names
            return DDPMScheduler.from_pretrained(sub, local_files_only=True)
        if name == "unet":
            model = UNET.denoiser_type().from_pretrained(sub, torch_dtype=dtype, local_files_only=True)
        elif name == "vae":
            model = AutoencoderKL.from_pretrained(sub, torch_dtype=dtype, local_files_only=True)
        else:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            model = cls.from_pretrained(sub, local_files_only=True).to(dtype)
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers/transformers/safetensors raise many types for bad files
        raise ModelLoadError(f"{sub}: cannot load {name}: {type(e).__name__}: {e}") from None
    return model.eval().requires_grad_(False)


DEMO_BASE = "demo"
DEMO_DIT_BASE = "demo-dit"  # the shipped Flux-style DiT demo base (catfast/demo/assets/dit_model)


def quiet_progress_bars() -> None:
    """Turn off the progress bar diffusers/transformers draw per component load or save (catfast draws
    its own per job). Called where models are loaded, not at startup: importing either library costs
    seconds, which `catfast --help` and `adapter info` must not pay."""

    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            importlib.import_module(name).disable_progress_bar()
        except ImportError:
            pass


def base_location(spec: str | os.PathLike) -> str | os.PathLike:
    """What a ``--base SPEC`` names, before anything is loaded: ``"demo"`` is the demo model shipped in
    the package (catfast/demo/assets/model, a diffusers folder); any other SPEC is returned unchanged
    (a local folder that is itself called demo: pass ``./demo``). Every command that takes a base
    (train, cat-step, eval kps, export onnx, serve) resolves it here; the shipped files are checked against
    their manifest first (a damaged install says so instead of failing somewhere in diffusers)."""
    if os.fspath(spec) in (DEMO_BASE, DEMO_DIT_BASE):
        check_assets()
        return model_path() if os.fspath(spec) == DEMO_BASE else dit_model_path()
    return spec


def is_demo_base(spec: str | os.PathLike) -> bool:
    """True when ``--base SPEC`` names the shipped demo model: ``demo``, or the path of its folder."""
    if os.fspath(spec) == DEMO_BASE:
        return True
    try:
        return Path(spec).resolve() == Path(model_path()).resolve()
    except (OSError, ValueError):
        return False


def load_base(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    unet_file: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> BaseModel:
    """Load every component of the local diffusers folder `path` (never the hub). Models are in eval mode
    with requires_grad False, in `dtype` on `device`; the scheduler is a DDPMScheduler built from the
    folder's scheduler config. With `unet_file`, the UNet comes from that single file (see
    `load_unet_file`) with the folder's unet/config.json, and the folder's UNet weights are not read.
    ``"demo"``: the shipped demo model (`base_location`). A file instead of a folder: `load_single_file`."""
    folder = Path(base_location(path))
    if folder.is_file() and unet_file is None:
        return load_single_file(folder, dtype=dtype, device=device, allow_pickle=allow_pickle)
    quiet_progress_bars()
    components = _read_model_index(folder)
    loaded = {}
    for name in components:
        if name == "unet" and unet_file is not None:
            loaded[name] = load_unet_file(unet_file, folder / "unet", allow_pickle=allow_pickle, dtype=dtype)
            loaded[name].eval().requires_grad_(False)
        else:
            loaded[name] = _load_component(folder, name, dtype)
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if enc in loaded and len(loaded[tok]) > loaded[enc].config.vocab_size:
            raise ModelLoadError(
                f"{folder}: {tok} has {len(loaded[tok])} tokens but {enc} only {loaded[enc].config.vocab_size}"
            )
    for component in loaded.values():
        if isinstance(component, torch.nn.Module):
            component.to(device)
    return BaseModel(**loaded, path=folder, unet_file=None if unet_file is None else Path(unet_file))


def resolve_base(
    spec: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> BaseModel:
    """What every `--base SPEC [--base-config DIR]` means: SPEC a diffusers folder (config must be None), a
    single-file SD1.x / SDXL checkpoint (`load_single_file`; ``config`` optional), a UNet weights file with
    ``config`` the diffusers folder that supplies the rest, a Hugging Face Hub model id ("owner/name",
    fetched or found in the local hub cache; see `hub_folder`), or "demo", the shipped demo model
    (`base_location`)."""
    spec = base_location(spec)
    if config is None and not Path(spec).exists() and _HUB_ID.fullmatch(str(spec)):
        return load_base(hub_folder(str(spec)), dtype=dtype, device=device)
    spec = Path(spec)
    if spec.is_dir():
        if config is not None:
            raise ModelLoadError(f"{spec}: is a diffusers folder; config= is only for a single UNet file")
        return load_base(spec, dtype=dtype, device=device)
    if not spec.exists():
        raise ModelLoadError(f"{spec}: no such file or folder")
    return load_single_file(spec, config=config, dtype=dtype, device=device, allow_pickle=allow_pickle)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# a diffusers repo's pipeline files, without the duplicates many carry (fp16 / non-EMA variants, the
# single-file checkpoints at the root, pickles and other frameworks' weights)
_HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin", "*.msgpack", "*.h5", "*.onnx*", "*.pb", "*.pt", "*.pth"]


def hub_folder(repo_id: str) -> Path:
    """The local folder of the hub repo ``repo_id``: from the local hub cache when it is there (always with
    HF_HUB_OFFLINE=1), else downloaded into it. ModelLoadError when neither works."""
    from huggingface_hub import snapshot_download  # lazy: hub

    try:
        return Path(snapshot_download(repo_id, ignore_patterns=_HUB_IGNORE))
    except Exception as e:  # offline, unknown repo, gated, network: hub raises many types
        raise ModelLoadError(
            f"{repo_id}: not a local file or folder, and the Hugging Face Hub did not provide it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); pass a local "
            "diffusers folder, or go online"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# single-file checkpoints (A1111 / civitai)

SINGLE_FILE_CONFIGS = Path(__file__).with_name("single_file")  # sd15/, sdxl/: diffusers configs, no weights


def load_single_file(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> BaseModel:
    """A base from ONE weights file (module docstring): a whole SD1.x / SDXL checkpoint in the original layout
    (configs from ``config``, a diffusers folder, or else the shipped ones of its kind), or UNet weights only
    with ``config`` the diffusers folder that supplies the rest. ModelLoadError names the file and what does
    not fit, and for UNet weights without ``config`` the flag that supplies it (--base-config)."""
    path = Path(path)
    state = _read_state_dict(path, allow_pickle)
    kind = single_file_kind(state)
    if kind == "unet":
        if config is None:
            naming = "original" if any(k.startswith(LDM_UNET_PREFIX) for k in state) else "diffusers"
            raise ModelLoadError(
                f"{path}: holds UNet weights only ({naming} naming), no VAE and text encoder: pass --base-config "
                "DIR, a diffusers folder that supplies the UNet config, text encoder(s), tokenizer(s), VAE and "
                "scheduler (a whole SD1.x / SDXL checkpoint needs none)"
            )
        del state
        return load_base(config, dtype=dtype, device=device, unet_file=path, allow_pickle=allow_pickle)
    if kind == "sd2" and config is None:
        raise ModelLoadError(
            f"{path}: an SD 2.x checkpoint (OpenCLIP-H text encoder); catfast ships the configs of SD 1.x and SDXL "
            "single files only: pass --base-config DIR, a diffusers SD 2.x folder"
        )
    quiet_progress_bars()
    loaded = components_from_state(state, kind, config=config, where=str(path), dtype=dtype)
    del state
    for component in loaded.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False).to(device)
    return BaseModel(**loaded, file=path)


def components_from_state(
    state: dict[str, torch.Tensor],
    kind: str,
    *,
    config: str | os.PathLike | None = None,
    where: str = "checkpoint",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Every component (diffusers' model_index names) of a whole single-file checkpoint's ``state`` of
    ``kind`` (`single_file_kind`), with the configs of ``config`` or the shipped ones. Meta tensors give meta
    models (the tests check real SD1.5 / SDXL shapes against the shipped configs so, without the memory)."""
    folder = Path(config) if config is not None else SINGLE_FILE_CONFIGS / kind
    where = f"{where} (configs from {folder}{'' if config is not None else '; --base-config DIR for another shape'})"
    loaded = dict(
        unet=_unet_from_state(state, _unet_config(folder)[0], where, dtype),
        vae=_vae_from_state(state, folder, where, dtype),
        text_encoder=_text_encoder_from_state(state, folder, "text_encoder", kind, where, dtype),
        tokenizer=_single_file_tokenizer(folder, "tokenizer", config is not None),
        scheduler=_load_component(folder, "scheduler", dtype),
    )
    if kind == "sdxl":
        loaded["text_encoder_2"] = _text_encoder_from_state(state, folder, "text_encoder_2", kind, where, dtype)
        loaded["tokenizer_2"] = _single_file_tokenizer(folder, "tokenizer_2", config is not None, pad_token="!")
    return loaded


def _single_file_tokenizer(folder: Path, name: str, given: bool, pad_token: str | None = None):
    """The tokenizer of a single-file base: a given config folder's own, else real CLIP's (shipped merges)."""
    from catfast.integrations.tokenizer import EOS, clip_tokenizer  # lazy: transformers

    if given:
        return _load_component(folder, name, torch.float32)
    return clip_tokenizer(pad_token or EOS)
