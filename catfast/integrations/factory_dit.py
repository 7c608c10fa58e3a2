"""Random-weight diffusion-transformer models (``integrations/factory.py`` delegates here): ``tiny-flux``,
``tiny-sd3`` and ``tiny-qwenimage`` (a tiny transformer, tiny text encoders, a tiny VAE; complete pipeline
folders that diffusers' own pipelines load offline; the Qwen parts in factory_qwen.py), ``flux-narrow``
(FLUX.1's widths and head sizes at a CPU-benchmark depth; transformer only), and the real transformers'
shapes ``flux-dev``, ``sd3-medium``, ``sd35-large``, ``qwen-image`` (transformer only, for the meta device).
No hub access: tokenizers are built here (the CLIP ones are catfast's offline CLIP tokenizer, the T5 one a
small Unigram vocabulary, ``t5_tokenizer``; the Qwen one a byte-level BPE, ``factory_qwen.qwen_tokenizer``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from catfast.errors import ModelLoadError
from catfast.folders import check_target, staged_folder
from catfast.integrations.factory_parts import clip_text_config, seeded
from catfast.integrations.families import FAMILIES
from catfast.integrations.tokenizer import build_tokenizer

PIPELINE_NAMES = ("tiny-flux", "tiny-sd3", "tiny-qwenimage")
TRANSFORMER_ONLY_NAMES = ("flux-narrow", "flux-dev", "sd3-medium", "sd35-large", "qwen-image")
DIT_MODEL_NAMES = PIPELINE_NAMES + TRANSFORMER_ONLY_NAMES
FAMILY_OF_NAME = {
    **{name: "flux" for name in ("tiny-flux", "flux-narrow", "flux-dev")},
    **{name: "sd3" for name in ("tiny-sd3", "sd3-medium", "sd35-large")},
    **{name: "qwenimage" for name in ("tiny-qwenimage", "qwen-image")},
}

# The real transformers' config.json values (transformer only, built on the meta device: shapes for benchmarks
# and memory arithmetic). black-forest-labs/FLUX.1-dev: 24 heads x 128 (3072 wide), T5-XXL's 4096-wide text,
# CLIP-L's 768 pooled, rotary 16 + 56 + 56, guidance-distilled.
_FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# stabilityai/stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-large
_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=4096)
_SD3 |= dict(pooled_projection_dim=2048, pos_embed_max_size=192, attention_head_dim=64)
_REAL_CONFIGS: dict[str, dict] = {
    "flux-dev": _FLUX_DEV,
    "sd3-medium": dict(_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536),
    "sd35-large": dict(_SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
    # Qwen/Qwen-Image: 60 blocks of 24 heads x 128, Qwen2.5-VL-7B's 3584-wide states
    "qwen-image": dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    ),
}

_TRANSFORMER_CONFIGS: dict[str, dict] = {
    **_REAL_CONFIGS,
    # FluxTransformer2DModel: 16 latent channels packed 2x2 (64 in), 2 heads x 16 (rotary axes 4 + 6 + 6),
    # one double and one single block, guidance-distilled like FLUX.1-dev; text 32 wide (T5), pooled 32 (CLIP)
    "tiny-flux": dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    # FLUX.1-dev's widths with 1 double and 1 single block (FLUX.1 has 19 and 38): about 0.5 B parameters
    "flux-narrow": dict(_FLUX_DEV, num_layers=1, num_single_layers=1),
    # SD3Transformer2DModel: 16 latent channels, 2x2 patches, 2 blocks of 4 heads x 8; text 64 wide (T5; the
    # two 32-wide CLIPs side by side fill it), pooled 64 (32 + 32)
    "tiny-sd3": dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    ),
    # QwenImageTransformer2DModel: 16 latent channels packed 2x2, 2 blocks of 2 heads x 16 (rotary 4 + 6 + 6),
    # text 32 wide (the tiny Qwen2.5-VL's hidden size)
    "tiny-qwenimage": dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
}

# A 2x VAE with the transformer families' 16 latent channels and their latent scale and shift, no quant convs
# (FLUX.1's: scaling 0.3611, shift 0.1159; SD3's: 1.5305, 0.0609)
_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    sample_size=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_VAE_FACTORS = {"tiny-flux": (0.3611, 0.1159), "tiny-sd3": (1.5305, 0.0609)}
_CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
_T5_TINY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)

# Words of the T5 tokenizer's vocabulary (whole-word pieces; anything else is spelled by characters)
_T5_WORDS = """a an the of and in on at with photo picture image painting drawing style portrait of sks cat dog
man woman person toy statue car house tree flower star ball box moon sky beach forest city street room red
blue green yellow black white grey orange purple pink brown small large background plain sitting standing"""


def transformer_config(name: str) -> dict:
    """The transformer config of a named DiT factory model (a fresh copy)."""
    if name not in _TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown transformer model {name!r}; choose one of {', '.join(DIT_MODEL_NAMES)}")
    return dict(_TRANSFORMER_CONFIGS[name])


def build_transformer(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
    """The named model's transformer (its family's diffusers class) with seeded random weights, eval mode.
    ``device="meta"`` builds the shapes only (``flux-narrow`` is about 0.5 B parameters, the real ones 2 to 20 B)."""
    family = FAMILIES[FAMILY_OF_NAME.get(name, "")] if name in FAMILY_OF_NAME else None
    if family is None:
        raise ValueError(f"unknown transformer model {name!r}; choose one of {', '.join(DIT_MODEL_NAMES)}")
    cls, config = family.denoiser_type(), transformer_config(name)
    if device == "meta":
        with torch.device("meta"):
            return cls(**config).eval()
    model = seeded(seed, lambda: cls(**config)).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (transformers' ``T5Tokenizer``: a Unigram model with T5's ``<pad>`` 0, ``</s>`` 1, ``<unk>``
    2 and the ``▁`` word marker) over a small built-in vocabulary: whole words, then single characters."""
    from transformers import T5Tokenizer  # lazy: transformers

    words = list(dict.fromkeys(_T5_WORDS.split()))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0 - i / 1000) for i, w in enumerate(words)]
    vocab += [(chr(c), -20.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip(seed: int, projection: bool, **overrides):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # lazy: transformers


    config = clip_text_config(**{**_CLIP_TINY, **overrides})
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return seeded(seed, lambda: cls(config)).eval()


def _t5(seed: int, tokenizer, **overrides):
    from transformers import T5Config, T5EncoderModel  # lazy: transformers

    config = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **{**_T5_TINY, **overrides})
    return seeded(seed, lambda: T5EncoderModel(config)).eval()


def _vae(name: str, seed: int):
    from diffusers import AutoencoderKL  # lazy: diffusers

    scaling, shift = _VAE_FACTORS[name]
    return seeded(seed, lambda: AutoencoderKL(**_VAE, scaling_factor=scaling, shift_factor=shift)).eval()


def _scheduler(name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler  # lazy: diffusers

    return FlowMatchEulerDiscreteScheduler(**FAMILIES[FAMILY_OF_NAME[name]].scheduler_config)


def build_pipeline(name: str, *, seed: int = 0):
    """The named model as its family's diffusers pipeline (fp32, seeded random weights: transformer ``seed``,
    text encoders ``seed + 1`` ..., VAE ``seed + 9``), built offline."""
    if name not in PIPELINE_NAMES:
        raise ValueError(f"unknown pipeline model {name!r}; choose one of {', '.join(PIPELINE_NAMES)}")
    if name == "tiny-qwenimage":
        from catfast.integrations.factory_qwen import qwen_components  # lazy: the Qwen parts

        parts = qwen_components(seed)
        parts.update(transformer=build_transformer(name, seed=seed), scheduler=_scheduler(name))
        return FAMILIES[FAMILY_OF_NAME[name]].pipeline_type()(**parts)
    parts = dict(transformer=build_transformer(name, seed=seed), vae=_vae(name, seed + 9), scheduler=_scheduler(name))
    t5_tok = t5_tokenizer()
    if name == "tiny-flux":
        parts.update(
            text_encoder=_clip(seed + 1, False),
            tokenizer=build_tokenizer(),
            text_encoder_2=_t5(seed + 2, t5_tok),
            tokenizer_2=t5_tok,
        )
        return FAMILIES[FAMILY_OF_NAME[name]].pipeline_type()(**parts)
    parts.update(  # tiny-sd3: CLIP-L, CLIP-G (gelu, like OpenCLIP's), T5 64 wide
        text_encoder=_clip(seed + 1, True),
        tokenizer=build_tokenizer(),
        text_encoder_2=_clip(seed + 2, True, hidden_act="gelu"),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=_t5(seed + 3, t5_tok, d_model=64, d_kv=16),
        tokenizer_3=t5_tok,
    )
    return FAMILIES[FAMILY_OF_NAME[name]].pipeline_type()(**parts)


def init_dit_folder(name: str, out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the named random-weight DiT model as a complete diffusers pipeline folder (safetensors; the
    pipeline's own ``save_pretrained`` layout and model_index.json), staged beside ``out_dir`` and renamed
    into place. An existing non-empty ``out_dir`` is refused unless ``overwrite``."""
    from catfast.integrations.models import quiet_progress_bars

    if name not in PIPELINE_NAMES:
        only = " (transformer only: build_transformer)" if name in TRANSFORMER_ONLY_NAMES else ""
        raise ModelLoadError(f"no pipeline folder for {name!r}{only}; choose one of {', '.join(PIPELINE_NAMES)}")
    out = Path(out_dir).absolute()
    check_target(out, overwrite, ModelLoadError)
    quiet_progress_bars()
    pipe = build_pipeline(name, seed=seed)
    with staged_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
