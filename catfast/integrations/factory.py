"""Random-weight model factories: `tiny` (tests), `small` (CPU benchmarks), `sd15` and `sdxl` (real
shapes for GPU benchmarks). No hub access: everything is built from configs in this file."""

from __future__ import annotations

import torch

MODEL_NAMES = ("tiny", "small", "sd15", "sdxl")

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
}


def unet_config(name: str) -> dict:
    """The UNet2DConditionModel config of a named factory model (a fresh copy)."""
    if name not in _UNET_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return dict(_UNET_CONFIGS[name])


def build_unet(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A UNet2DConditionModel of the named shape with seeded random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(name))
    return unet if dtype == torch.float32 else unet.to(dtype)
