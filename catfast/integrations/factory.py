"""Random-weight model factories: `tiny` (tests), `small` (CPU benchmarks), `sd15` and `sdxl` (real
shapes for GPU benchmarks), plus `tiny-sdxl` (SDXL's structure at tiny size, for testing SDXL code paths).
The diffusion transformers (`tiny-flux`, `tiny-sd3`, `tiny-qwenimage`, `flux-narrow`) live in factory_dit.py.
No hub access: everything is built from configs in this file.

`build_unet` gives one UNet; `build_base` every component of a pipeline; `init_model_folder` writes them
as a complete diffusers folder that `load_base` and diffusers' own pipelines load offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from catfast.errors import ModelLoadError
from catfast.folders import check_target, staged_folder
from catfast.integrations.factory_dit import DIT_MODEL_NAMES, init_dit_folder
from catfast.integrations.factory_parts import clip_text_config, seeded
from catfast.integrations.families.unet import FAMILY as UNET
from catfast.integrations.models import BaseModel, quiet_progress_bars
from catfast.integrations.schedulers import training_scheduler
from catfast.integrations.tokenizer import build_tokenizer, save_tokenizer
from catfast.targets import ATTENTION_PROJECTIONS

MODEL_NAMES = ("tiny", "small", "sd15", "sdxl")
ALL_MODEL_NAMES = MODEL_NAMES + ("tiny-sdxl",)
UNET_ONLY_NAMES = ("sd15-narrow", "sd15-skeleton")  # build_unet / unet_config only (no text encoder, VAE or folder)

# UNet2DConditionModel configs. tiny/small keep SD1.5's structure (cross-attn down/up blocks, a
# cross-attn mid block, attn1/attn2/ff in every transformer block) at a fraction of the width.
_UNET_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 48),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "small": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    ),
    # SD1.5's widths and head sizes (320/640/1280 channels, 8 heads: head dims 40/80/160, 768-wide text) at
    # a CPU-benchmark size: 3 levels, one layer per block, 16x16 latents (128 px). UNet only (bench train-step).
    "sd15-narrow": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # SDXL's structure (two text encoders, text_time added conditioning, linear projections, several
    # transformer layers per block) at tiny size: cross_attention_dim 64 = 32 + 32, 80 = 32 + 6 * 8.
    "tiny-sdxl": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=8,
    ),
}

# SD1.5's exact module structure (4 levels, 2 layers per block, 16 transformer blocks, 8 heads) at widths where
# arithmetic is negligible (32 channels, 8x8 latents, 32-wide text): what is left of a step is the host's cost of
# issuing its ops, the CPU stand-in for a batch-1 GPU step (bench train-step's launch_ops).
_UNET_CONFIGS["sd15-skeleton"] = dict(
    _UNET_CONFIGS["sd15"], sample_size=8, block_out_channels=(32, 32, 32, 32), cross_attention_dim=32, norm_num_groups=8
)


def unet_config(name: str) -> dict:
    """The UNet2DConditionModel config of a named factory model (a fresh copy)."""
    if name not in _UNET_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ALL_MODEL_NAMES + UNET_ONLY_NAMES)}")
    return dict(_UNET_CONFIGS[name])


def build_unet(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A UNet2DConditionModel of the named shape with seeded random weights."""
    unet = seeded(seed, lambda: UNET.denoiser_type()(**unet_config(name)))
    return unet if dtype == torch.float32 else unet.to(dtype)


# CLIP text encoders. vocab_size and the special token ids come from catfast's offline tokenizer (real
# CLIP-L/bigG have 49,408 tokens: their embedding tables are larger than these, the rest is the same).
_CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
# OpenCLIP ViT-bigG/14 text tower, as text_encoder_2 of SDXL (hidden 1280, pooled projection 1280).
_CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
_CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
_TEXT_CONFIGS: dict[str, tuple[dict, dict | None]] = {  # (text_encoder, text_encoder_2 or None)
    "tiny": (_CLIP_TINY, None),
    "small": (
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256),
        None,
    ),
    "sd15": (_CLIP_L, None),
    "sdxl": (_CLIP_L, _CLIP_BIGG),
    "tiny-sdxl": (_CLIP_TINY, dict(_CLIP_TINY, hidden_act="gelu")),
}

# AutoencoderKL configs. sd15/sdxl: the real SD VAE (8x downsampling); tiny: 2 blocks (2x), small: 4 thin
# blocks (8x, like SD). scaling_factor: SD1.5's 0.18215, SDXL's 0.13025.
_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
)
_TINY_VAE = dict(
    _SD_VAE,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    sample_size=32,
)
_VAE_CONFIGS: dict[str, dict] = {
    "tiny": dict(_TINY_VAE, scaling_factor=0.18215),
    "small": dict(
        _SD_VAE, block_out_channels=(32, 64, 128, 128), layers_per_block=1, sample_size=256, scaling_factor=0.18215
    ),
    "sd15": dict(_SD_VAE, sample_size=512, scaling_factor=0.18215),
    "sdxl": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "tiny-sdxl": dict(_TINY_VAE, scaling_factor=0.13025),
}

# SD's training noise schedule (the DDPM view of the PNDM config SD1.5 and SDXL ship).


def _is_xl(name: str) -> bool:
    return _TEXT_CONFIGS[name][1] is not None


def _text_encoder(name: str, which: int, seed: int):
    """CLIPTextModel (which=1) or CLIPTextModelWithProjection (which=2, SDXL) of the named model."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # lazy: transformers

    config = clip_text_config(**_TEXT_CONFIGS[name][which - 1])
    cls = CLIPTextModel if which == 1 else CLIPTextModelWithProjection
    return seeded(seed, lambda: cls(config)).eval()


def _vae(name: str, seed: int):
    from diffusers import AutoencoderKL  # lazy: diffusers

    return seeded(seed, lambda: AutoencoderKL(**_VAE_CONFIGS[name])).eval()


def _scheduler():

    return training_scheduler()


def _component_makers(name: str, seed: int) -> dict:
    """Component name -> zero-argument builder, in diffusers' model_index naming. Each builder is seeded
    on its own (unet: seed, as build_unet; text_encoder: seed+1; text_encoder_2: seed+2; vae: seed+3), so
    one component can be built, saved and freed before the next (sdxl is ~14 GB in fp32)."""

    unet_config(name)  # validates the name
    makers = {
        "unet": lambda: build_unet(name, seed=seed).eval(),
        "text_encoder": lambda: _text_encoder(name, 1, seed + 1),
        "tokenizer": build_tokenizer,
        "vae": lambda: _vae(name, seed + 3),
        "scheduler": _scheduler,
    }
    if _is_xl(name):
        makers["text_encoder_2"] = lambda: _text_encoder(name, 2, seed + 2)
        makers["tokenizer_2"] = build_tokenizer
    return makers


def build_base(name: str, *, seed: int = 0):
    """Every component of the named model, fp32 with seeded random weights, as a `BaseModel` (eval mode).
    The UNet equals `build_unet(name, seed=seed)`."""

    return BaseModel(**{key: make() for key, make in _component_makers(name, seed).items()})


def _model_index(name: str) -> dict:
    """diffusers' model_index.json for the named model (``model_index``)."""
    return model_index(xl=_is_xl(name))


def model_index(*, xl: bool = False) -> dict:
    """diffusers' model_index.json of a Stable Diffusion (XL) folder, as StableDiffusion(XL)Pipeline.save_pretrained
    writes it (no safety checker, no feature extractor)."""
    import diffusers  # lazy: diffusers

    index = {
        "_class_name": UNET.pipeline_class(xl=xl),
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", UNET.denoiser_class],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if xl:
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=True,
        )
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    return dict(sorted(index.items()))


def _save_component(key: str, obj, out_dir: Path) -> None:

    if key.startswith("tokenizer"):
        save_tokenizer(obj, out_dir)
    elif isinstance(obj, torch.nn.Module):
        obj.save_pretrained(out_dir, safe_serialization=True)
    else:  # scheduler
        obj.save_pretrained(out_dir)


def init_model_folder(name: str, out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the named random-weight model as a complete diffusers folder (model_index.json, unet/,
    text_encoder/, tokenizer/, vae/, scheduler/, and text_encoder_2/ tokenizer_2/ for SDXL; safetensors)
    and return its path. Components are built, saved and freed one at a time. The folder is written
    beside the target under a temporary name and renamed into place, so a crash never leaves a half
    folder at `out_dir`. An existing non-empty `out_dir` is refused unless `overwrite`."""

    if name in DIT_MODEL_NAMES:  # tiny-flux, tiny-sd3, tiny-qwenimage: their family's pipeline folder
        return init_dit_folder(name, out_dir, seed=seed, overwrite=overwrite)
    out = Path(out_dir).absolute()
    check_target(out, overwrite, ModelLoadError)
    quiet_progress_bars()
    makers = _component_makers(name, seed)
    with staged_folder(out) as tmp:
        for key, make in makers.items():
            component = make()
            _save_component(key, component, tmp / key)
            del component
        (tmp / "model_index.json").write_text(json.dumps(_model_index(name), indent=2) + "\n")
    return out


def build_components(unet_config: dict, vae_config: dict, text_config, *, seed: int = 0) -> dict:
    """Untrained SD1-style components from configs, in diffusers' model_index naming (fp32, seeded: text
    encoder ``seed``, VAE ``seed + 1``, UNet ``seed + 2``), with catfast's offline tokenizer and the training
    scheduler. ``text_config``: a transformers CLIPTextConfig (``clip_text_config``)."""
    from diffusers import AutoencoderKL  # lazy: diffusers
    from transformers import CLIPTextModel  # lazy: transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config).eval().requires_grad_(False)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config)
        torch.manual_seed(seed + 2)
        unet = UNET.denoiser_type()(**unet_config)
    tokenizer, scheduler = build_tokenizer(), training_scheduler()
    return dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, scheduler=scheduler)


def save_components(parts: dict, folder: Path, *, dtype: torch.dtype = torch.float16) -> None:
    """Write SD1-style components (``build_components``' keys) as a diffusers folder: ``dtype`` safetensors
    weights (the models are left in fp32), tokenizer, scheduler, model_index.json."""
    for name in ("unet", "vae", "text_encoder"):
        # nn.Module.to: diffusers' own .to warns about casting to half (the folder loads as fp32 or any dtype)
        torch.nn.Module.to(parts[name], dtype).save_pretrained(folder / name, safe_serialization=True)
        torch.nn.Module.to(parts[name], torch.float32)
    _save_component("tokenizer", parts["tokenizer"], folder / "tokenizer")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")


def attention_weight_shapes(name: str) -> list[tuple[int, int]]:
    """[out, in] of every to_q/to_k/to_v/to_out.0 Linear of the named model's UNet (built on the meta
    device: no memory, no time)."""
    with torch.device("meta"):
        unet = UNET.denoiser_type()(**unet_config(name))
    suffixes = tuple("." + t for t in ATTENTION_PROJECTIONS)
    return [tuple(m.weight.shape) for n, m in unet.named_modules() if n.endswith(suffixes)]
