"""Test helpers for catfast's tests and benchmark scripts (no library module imports this one): the one
home of numerical tolerances, and the fixture builders they use, re-exported from where the library keeps
them (``randomize_lora_``: peft initialises lora_B to zero, which makes every output test pass)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from catfast.adapters.adapter import LoraAdapter, LoraLayer, layer_key
from catfast.bench.measure import flop_counter, rel_err
from catfast.integrations.peft_adapters import randomize_lora_
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.train.checkpoint import TrainState, capture_rng
from catfast.train.quickstart import synthetic_image

__all__ = [
    "FLOOR",
    "RTOL",
    "SGM_SDXL",
    "assert_close_to_ref",
    "assert_rel_close",
    "assert_same_layers",
    "cat_batch",
    "flop_counter",
    "make_data",
    "random_adapter",
    "randomize_lora_",
    "rel_err",
    "snapshot",
    "train_state",
    "unet_inputs",
]

# Floors added to the "at most twice torch's own error" rule (docs/design.md, "Adding a kernel").
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "tensor") -> None:
    """Assert ``rel_err(actual, expected) <= rtol`` with a message naming the worst element."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    err = rel_err(actual, expected)
    if not err <= rtol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {rtol:.1e} "
            f"(worst at {idx}: {actual[idx].item()} vs {expected[idx].item()})"
        )


def assert_close_to_ref(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, what: str = "out") -> None:
    """Kernel rule: ``max|out - ref32| <= 2 * max|ref_lowp - ref32| + FLOOR[out.dtype]``."""
    err = (out.double() - ref_fp32.double()).abs().max().item()
    torch_err = (ref_lowp.double() - ref_fp32.double()).abs().max().item()
    bound = 2 * torch_err + FLOOR[out.dtype]
    if not err <= bound:
        raise AssertionError(f"{what}: error {err:.3e} > 2 x torch's {torch_err:.3e} + floor {FLOOR[out.dtype]:.0e}")


RTOL = 1e-5  # fp32 outputs of two ways to apply the same adapter


# ------------------------------------------------------------------------------------------ fixtures


def random_adapter(models, *, ranks=(2, 3, 4), alphas=(3.0, 5.5, 1.0, 2.5), seed=0, dtype=torch.float32, leaves=None):
    """A LoRA layer on every Linear/Conv2d of each ``models[component]`` (or only names ending in one of
    ``leaves``), ranks and alphas cycling through the given values (alpha != rank), B random and nonzero."""
    g = torch.Generator().manual_seed(seed)
    layers, i = {}, 0
    for component, model in models.items():
        for name, m in model.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or (leaves and not name.endswith(leaves)):
                continue
            r = ranks[i % len(ranks)]
            w = m.weight
            down = torch.randn((r, *w.shape[1:]), generator=g) / w[0].numel() ** 0.5
            up = torch.randn((w.shape[0], r, *([1] * (w.ndim - 2))), generator=g) * 0.2
            layers[layer_key(component, name)] = LoraLayer(down.to(dtype), up.to(dtype), alpha=alphas[i % len(alphas)])
            i += 1
    return LoraAdapter(layers)


def unet_inputs(seed: int = 0):
    """(sample, timesteps, encoder_hidden_states) for the tiny UNet, batch 2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g)


def snapshot(model: torch.nn.Module) -> dict:
    """A copy of every tensor of ``model``'s state dict."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_layers(got: LoraAdapter, want: LoraAdapter) -> None:
    """Same layer keys, bit-identical down/up (any layout of the same numbers) and alpha."""
    assert got.layers.keys() == want.layers.keys()
    for key, layer in want.layers.items():
        other = got.layers[key]
        assert math.isclose(other.alpha, layer.alpha, rel_tol=1e-7), key
        assert other.down.dtype == layer.down.dtype and torch.equal(other.down.reshape(layer.down.shape), layer.down)
        assert torch.equal(other.up.reshape(layer.up.shape), layer.up), key


def cat_batch(batch: int, seed: int = 0) -> dict:
    """Seeded ``cat_loss`` inputs for the tiny UNet (4 x 16 x 16 latents, 7 tokens of width 32)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 4, 16, 16, generator=g),
        noise=torch.randn(batch, 4, 16, 16, generator=g),
        timesteps=torch.randint(0, 1000, (batch,), generator=g),
        cond=torch.randn(batch, 7, 32, generator=g),
        cond_stripped=torch.randn(batch, 7, 32, generator=g),
    )


def cat_plan(batch: int, slot: int = 0, scale: float = 1.0) -> RowPlan:
    """The fused CAT layout of ``batch`` samples: [trigger | stripped] (2 * batch rows) on ``slot`` at
    ``scale`` with grad, then ``batch`` teacher rows (base, no grad)."""
    n = 2 * batch
    return RowPlan.build([slot] * n + [NO_ADAPTER] * batch, [scale] * n + [0.0] * batch, [True] * n + [False] * batch)


def make_data(folder: Path, trigger: str = "sks", n: int = 4, seed: int = 0) -> Path:
    """``n`` 32 px PNGs (the tiny model's native size) with captions that carry ``trigger``."""
    folder.mkdir(parents=True)
    for i in range(n):
        synthetic_image(32, seed + i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{trigger}, a star of colour {seed + i}")
    return folder


def train_state(step: int, value: float) -> TrainState:
    """A small checkpoint state whose tensors are all ``value`` (which checkpoint was read back shows in them)."""
    return TrainState(
        step=step,
        epoch=1,
        batch_index=step % 3,
        lora={"w": torch.full((64, 64), value)},
        optimizer={"state": {0: {"exp_avg": torch.full((64, 64), value)}}, "param_groups": [{"lr": 0.1}]},
        scheduler={"last_epoch": step},
        scaler=None,
        rng=capture_rng(torch.Generator().manual_seed(step)),
        settings={"lr": 0.1, "world_size": 1},
        config_hash="abc",
    )


# kohya / SGM (original SDXL) module names -> diffusers names, one of each kind of layer (the kohya tests).
SGM_SDXL = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_5_1_transformer_blocks_1_attn1_to_q": "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q",
    "input_blocks_8_1_transformer_blocks_9_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_0_attn2_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks_0_1_proj_out": "up_blocks.0.attentions.0.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_1_transformer_blocks_0_attn2_to_k": "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
    "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "time_embed_0": "time_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "out_2": "conv_out",
}


# ------------------------------------------------------------------- the original (A1111 / LDM) key layout

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def unet_to_ldm(state: dict, cfg: dict) -> dict:
    """diffusers UNet naming -> original LDM naming (`model.diffusion_model.*`), the inverse of diffusers'
    convert_ldm_unet_checkpoint (diffusers ships no helper for this direction). Its top-level names come
    from diffusers' own DIFFUSERS_TO_LDM_MAPPING; the block numbering is LDM's: input block n holds
    (resnet .0, attention .1) or a downsampler (.0.op); output blocks hold resnet .0, attention .1 and the
    upsampler last."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if cfg.get("addition_embed_type") == "text_time":
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    per = cfg["layers_per_block"] + 1
    out = {}
    for key, value in state.items():
        p = key.split(".")
        resnet = ".".join([_RESNET_TO_LDM.get(p[4], p[4])] + p[5:]) if len(p) > 4 else ""
        rest = ".".join(p[4:])
        if key in top:
            new = top[key]
        elif p[0] == "mid_block":
            idx = 1 if p[1] == "attentions" else 2 * int(p[2])
            tail = ".".join([_RESNET_TO_LDM.get(p[3], p[3])] + p[4:]) if p[1] == "resnets" else ".".join(p[3:])
            new = f"middle_block.{idx}.{tail}"
        elif p[0] == "down_blocks":
            b, kind, j = int(p[1]), p[2], int(p[3])
            if kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * per}.0.op.{p[5]}"
            else:
                new = f"input_blocks.{b * per + j + 1}." + (f"0.{resnet}" if kind == "resnets" else f"1.{rest}")
        elif p[0] == "up_blocks":
            b, kind, j = int(p[1]), p[2], int(p[3])
            if kind == "upsamplers":
                has_attn = "CrossAttn" in cfg["up_block_types"][b]
                new = f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv.{p[5]}"
            else:
                new = f"output_blocks.{b * per + j}." + (f"0.{resnet}" if kind == "resnets" else f"1.{rest}")
        else:
            raise AssertionError(f"no LDM name for {key}")
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict, cfg: dict) -> dict:
    """diffusers AutoencoderKL naming -> the original layout (`first_stage_model.*`), the inverse of diffusers'
    convert_ldm_vae_checkpoint: its top-level names from DIFFUSERS_TO_LDM_MAPPING["vae"]; ``down_blocks.i``
    -> ``down.i`` (``resnets.j`` -> ``block.j``, ``conv_shortcut`` -> ``nin_shortcut``), the decoder's
    ``up_blocks.i`` -> ``up.(n-1-i)``, ``mid_block.resnets.k`` -> ``mid.block_(k+1)``, and the mid attention's
    linear projections back to LDM's 1x1 convolutions."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(cfg["up_block_types"])
    out = {}
    for key, value in state.items():
        if key in top:
            out["first_stage_model." + top[key]] = value
            continue
        coder, block, *p = key.split(".")
        if block == "mid_block" and p[0] == "attentions":
            name = ".".join(p[2:-1])
            out[f"first_stage_model.{coder}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[name]}.{p[-1]}"] = (
                value[:, :, None, None] if value.ndim == 2 else value
            )
            continue
        tail = ".".join(p[2:]).replace("conv_shortcut", "nin_shortcut")
        if block == "mid_block":
            new = f"mid.block_{int(p[1]) + 1}.{tail}"
        else:
            i = int(p[0]) if block == "down_blocks" else n_up - 1 - int(p[0])
            side = "down" if block == "down_blocks" else "up"
            if p[1] == "resnets":
                new = f"{side}.{i}.block.{p[2]}.{'.'.join(p[3:]).replace('conv_shortcut', 'nin_shortcut')}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{i}.{'downsample' if side == 'down' else 'upsample'}.{'.'.join(p[3:])}"
        out[f"first_stage_model.{coder}.{new}"] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """A transformers CLIP text model's weights in CLIP's own layout under ``prefix`` (SD1.x:
    ``cond_stage_model.transformer.``; SDXL's first encoder: ``conditioner.embedders.0.transformer.``)."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection's weights in OpenCLIP's layout under ``prefix`` (SDXL's
    second encoder: ``conditioner.embedders.1.model.``), the inverse of diffusers' convert_open_clip_checkpoint:
    DIFFUSERS_TO_LDM_MAPPING["openclip"]'s names, q/k/v joined into ``in_proj``, the projection transposed."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    names = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key in names["layers"]:
            out[prefix + names["layers"][key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        if key.endswith("position_ids") or any(f"self_attn.{w}_proj" in key for w in "kv"):
            continue
        new = key
        for diffusers_part, ldm_part in names["transformer"].items():
            new = new.replace(diffusers_part, ldm_part)
        if ".attn.q_proj." in new:
            kind = new.rsplit(".", 1)[1]
            qkv = [state[key.replace("q_proj", w + "_proj")] for w in "qkv"]
            new = new.replace(".q_proj." + kind, ".in_proj_" + kind)
            value = torch.cat(qkv)
        out[prefix + "transformer." + new] = value
    return out


def original_checkpoint(base) -> dict:
    """Every weight of ``base`` (a `BaseModel` of SD1 or SDXL structure) as one A1111 / civitai single-file
    checkpoint in the original layout: UNet, VAE and text encoder(s)."""
    out = unet_to_ldm(base.unet.state_dict(), dict(base.unet.config))
    out.update(vae_to_ldm(base.vae.state_dict(), dict(base.vae.config)))
    if base.text_encoder_2 is None:
        out.update(clip_to_ldm(base.text_encoder.state_dict(), "cond_stage_model.transformer."))
    else:
        out.update(clip_to_ldm(base.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_ldm(base.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous() for k, v in out.items() if not k.endswith("position_ids")}
