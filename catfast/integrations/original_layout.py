"""Diffusers models in the original (A1111 / civitai, LDM) key layout: the inverse of diffusers' single-file
converters, which diffusers ships in one direction only. `original_checkpoint` writes a whole SD1 / SDXL base
as one single-file checkpoint (what `load_single_file` reads back; the tests write the factories' models so).
Every name comes from diffusers' own tables (``DIFFUSERS_TO_LDM_MAPPING``) or the block numbering its
converters undo."""

from __future__ import annotations

import torch

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
