"""Qwen-Image: ``QwenImageTransformer2DModel`` in a ``QwenImagePipeline`` folder.

Forward: the VAE's 16-channel latents (``AutoencoderKLQwenImage`` is a video VAE: ``[B, 16, 1, H, W]``; the
seam passes ``[B, 16, H, W]``) packed 2x2 into tokens like Flux's, Qwen2.5-VL's last hidden states
``encoder_hidden_states [B, L, 3584]`` with their ``encoder_hidden_states_mask [B, L]``, ``timestep = sigma``
and ``img_shapes`` (one ``(frames, H/2, W/2)`` list per sample); no pooled vector, no guidance embedding
(true CFG). Condition keys: ``prompt_embeds`` and ``prompt_embeds_mask`` (``QwenImagePipeline.encode_prompt``'s;
its mask is None when no token is padding)."""

from __future__ import annotations

import contextlib

import torch

from catfast.integrations.families.base import (
    Cond,
    DenoiserFamily,
    FlowRecipe,
    SamplingRecipe,
    compute_dtype,
    first_output,
    pipeline_warnings,
    text_device,
)
from catfast.integrations.families.flux import pack, unpack

# diffusers' train_dreambooth_lora_qwen_image.py's default targets
QWEN_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")

# Qwen/Qwen-Image scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
QWEN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


class QwenImageFamily(DenoiserFamily):
    name = "qwenimage"
    pipeline_classes = ("QwenImagePipeline",)
    denoiser_key = "transformer"
    denoiser_class = "QwenImageTransformer2DModel"
    default_targets = QWEN_TARGETS
    sharing = ()
    flow = FlowRecipe(dynamic=(256, 8192, 0.5, 0.9))
    # QwenImagePipeline guides only with a negative prompt; the Qwen-Image model card passes " "
    sampling = SamplingRecipe("cfg_norm", True, 1.15, 4.0, " ")
    patch = 2
    packs_latents = True
    scheduler_config = QWEN_SCHEDULER

    max_sequence_length = 1024

    pack = staticmethod(pack)
    unpack = staticmethod(unpack)

    def encode_prompt(self, pipe, captions: list[str], *, max_sequence_length: int | None = None) -> Cond:
        """Qwen2.5-VL's states of each caption (the chat template's prefix dropped), padded to the batch's
        longest with a mask (None when no row is padded); rows of separate calls may differ in length."""
        length = max_sequence_length or self.max_sequence_length
        with pipeline_warnings(pipe):
            embeds, mask = pipe.encode_prompt(list(captions), device=text_device(pipe), max_sequence_length=length)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def concat_conds(self, conds: list[Cond]) -> Cond:
        """The rows of ``conds`` in one condition: shorter captions' states padded with zeros to the longest,
        masked out (the pipeline's own batching of captions of several lengths)."""
        length = max(c["prompt_embeds"].shape[1] for c in conds)
        embeds, masks = [], []
        for c in conds:
            e, mask = c["prompt_embeds"], c.get("prompt_embeds_mask")
            if mask is None:  # encode_prompt's "no row padded"
                mask = torch.ones(e.shape[:2], dtype=torch.long, device=e.device)
            pad = length - e.shape[1]
            embeds.append(torch.nn.functional.pad(e, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(mask, (0, pad)))
        return {"prompt_embeds": torch.cat(embeds), "prompt_embeds_mask": torch.cat(masks)}

    def example_cond(self, model: torch.nn.Module, batch: int, tokens: int, generator=None) -> Cond:
        cond = super().example_cond(model, batch, tokens, generator)
        return {**cond, "prompt_embeds_mask": torch.ones(batch, tokens, dtype=torch.long)}

    def _stats(self, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape)
        std = torch.tensor(vae.config.latents_std).view(shape)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def encode_latents(self, vae, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-channel ``(z - latents_mean) / latents_std`` of the one-frame video latent, frame axis dropped
        (train_dreambooth_lora_qwen_image.py's normalisation)."""
        z = vae.encode(pixels.to(vae.dtype)[:, :, None]).latent_dist.sample(generator)
        mean, std = self._stats(vae, z)
        return ((z - mean) / std)[:, :, 0]

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(vae.dtype)[:, :, None]
        mean, std = self._stats(vae, z)
        return vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]

    def predict(self, model, latents: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _, h, w = latents.shape
        dtype = compute_dtype(model)
        out = model(
            hidden_states=pack(latents).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=cond.get("prompt_embeds_mask"),
            timestep=sigmas.to(latents.device, dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )
        return unpack(first_output(out), h, w)


    def real_rotary_factors(self, model, side: tuple[int, int], text_len: int) -> tuple:
        """The rotary factors of latents of ``side`` (h, w) and ``text_len`` text tokens as real ``(cos, sin)``
        ``[S, head_dim]`` pairs (image, text): diffusers' ``QwenEmbedRope`` makes them complex (``torch.polar``),
        which ONNX cannot express; each pair's angle is repeated for the interleaved pair it rotates."""
        h, w = side
        image, text = model.pos_embed([(1, h // 2, w // 2)], device="cpu", max_txt_seq_len=text_len)
        return tuple((f.real.repeat_interleave(2, -1), f.imag.repeat_interleave(2, -1)) for f in (image, text))

    @contextlib.contextmanager
    def real_rotary(self, model, factors: tuple):
        """Within the block ``model`` rotates queries and keys with ``factors`` (``real_rotary_factors``) in real
        arithmetic, ``(a cos - b sin, a sin + b cos)`` per interleaved pair: the complex product diffusers computes,
        without complex tensors (for the ONNX export, ``catfast.export.dit_graphs``)."""
        import diffusers.models.transformers.transformer_qwenimage as qwen  # lazy: diffusers

        complex_apply, rope_forward = qwen.apply_rotary_emb_qwen, model.pos_embed.forward
        qwen.apply_rotary_emb_qwen = _real_rotary
        model.pos_embed.forward = lambda *args, **kwargs: factors
        try:
            yield
        finally:
            qwen.apply_rotary_emb_qwen = complex_apply
            model.pos_embed.forward = rope_forward


def _real_rotary(x: torch.Tensor, freqs, use_real: bool = False, use_real_unbind_dim: int = -1) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb_qwen`` for ``x`` ``[B, S, H, D]`` with real factors ``(cos, sin)`` ``[S, D]``."""
    cos, sin = (f[:, None] for f in freqs)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


FAMILY = QwenImageFamily()
