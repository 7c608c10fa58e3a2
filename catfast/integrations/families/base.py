"""What every model family declares (docs/design.md, "Model families"): the base class each family module
subclasses, the flow-matching training recipe of the transformer families, and the one way to run a model
with its LoRA switched off (the CAT teacher: the same weights, never a second model).

A family is data plus a few small functions. It is the one place that knows a denoiser's class, the
keyword names and layout of its forward, its LoRA targets, its noise schedule and its latent packing; the
rest of catfast asks it and never checks a class name. Latents cross the seam in the VAE's layout
``[B, C, H, W]`` (scaled and shifted), conditions as a ``dict`` of batch-major tensors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

Cond = dict[str, torch.Tensor]


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """``model.dtype`` as diffusers' ``ModelMixin`` gives it when no layerwise-casting hook is set (catfast sets
    none): the first floating parameter's dtype outside ``_keep_in_fp32_modules``. diffusers first walks every
    module for such hooks, a walk that grows with the peft adapters attached (15% of a 1-row, 2-step tiny-flux
    sampler run with 64 adapters resident, cProfile, 1 thread)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    last = None
    for name, param in model.named_parameters():
        last = param.dtype
        if keep and any(m in name for m in keep):
            continue
        if param.is_floating_point():
            return param.dtype
    return last or torch.float32


def text_device(pipe) -> torch.device:
    """The device the pipeline's text encoders run on (its first text encoder's), for ``encode_prompt(device=)``:
    left out, diffusers' ``_execution_device`` walks every module of every component, the transformer's peft
    layers included (20% of a 1-row, 2-step tiny-flux sampler run with 64 adapters resident, cProfile, 1 thread)."""
    return next(pipe.text_encoder.parameters()).device


@dataclass(frozen=True)
class FlowRecipe:
    """How a flow-matching family samples training timesteps, as diffusers' ``train_dreambooth_lora_*``
    scripts do: ``u`` from ``compute_density_for_timestep_sampling(weighting_scheme, ...)``, quantized to
    one of the scheduler's ``num_train_timesteps`` (``indices = (u * N).long()``), then shifted:

    - ``shift`` (static, SD3: 3.0): ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``, the scheduler's own
      rule when ``use_dynamic_shifting`` is off;
    - ``dynamic`` (Flux, Qwen-Image): ``(base_seq_len, max_seq_len, base_shift, max_shift)``; ``mu`` grows
      linearly with the image's token count (the pipelines' ``calculate_shift``) and
      ``sigma' = exp(mu) / (exp(mu) + 1 / sigma - 1)`` (the scheduler's exponential ``time_shift``): the
      schedule the pipelines sample with, and the "flux_shift" of ai-toolkit and musubi-tuner. (diffusers'
      Flux script draws from the scheduler's unshifted grid, since ``use_dynamic_shifting`` leaves it
      unshifted; ``resolution_shift=False`` does the same.)

    ``loss_weighting``: ``compute_loss_weighting_for_sd3``'s scheme ("none", "sigma_sqrt", "cosmap").
    ``guidance``: the value fed to a guidance-distilled transformer's guidance embedding (Flux-dev; the
    Flux script's ``--guidance_scale`` default 3.5), unused where the model has none."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic: tuple[int, int, float, float] | None = None
    resolution_shift: bool = True
    loss_weighting: str = "none"
    guidance: float = 3.5

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift's ``mu`` for an image of ``image_seq_len`` transformer tokens."""
        base_len, max_len, base_shift, max_shift = self.dynamic
        slope = (max_shift - base_shift) / (max_len - base_len)
        return image_seq_len * slope + base_shift - slope * base_len

    def shifted(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """``sigmas`` (in (0, 1]) under the family's shift for an image of ``image_seq_len`` tokens."""
        if self.dynamic is not None:
            if not self.resolution_shift:
                return sigmas
            e = torch.tensor(self.mu(image_seq_len), dtype=torch.float64).exp()
            return (e / (e + (1 / sigmas.double() - 1))).to(sigmas.dtype)
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def sample_sigmas(self, batch: int, image_seq_len: int, *, generator: torch.Generator | None = None):
        """``batch`` training sigmas in (0, 1] (fp32, CPU; the timestep is ``1000 * sigma``)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling  # lazy: diffusers

        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        n = self.num_train_timesteps
        grid = torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n  # the scheduler's unshifted sigmas
        return self.shifted(grid[(u * n).long().clamp(max=n - 1)], image_seq_len)

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights ``[B]`` for ``sigmas`` ``[B]``."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3  # lazy: diffusers

        return compute_loss_weighting_for_sd3(self.loss_weighting, sigmas).float()


@dataclass(frozen=True)
class SamplingRecipe:
    """How the family's diffusers pipeline samples (its ``__call__``), for catfast's samplers and the ONNX runner:
    ``guidance`` "embed" (a guidance embedding, no CFG rows: Flux-dev), "cfg" (uncond rows), "cfg_norm" (CFG,
    then each token's velocity rescaled to the cond norm: QwenImagePipeline); ``flow_sigmas``: sigmas
    ``linspace(1, 1/steps, steps)`` with a resolution ``mu`` (else the scheduler's own grid); ``max_shift``:
    ``calculate_shift``'s value where the scheduler config has none; ``guidance_default``: the pipeline's default
    guidance_scale / true_cfg_scale; ``negative_default``: the negative prompt when none is given (None: no
    CFG)."""

    guidance: str
    flow_sigmas: bool
    max_shift: float
    guidance_default: float
    negative_default: str | None


class DenoiserFamily:
    """One model family. Subclasses set the class attributes and implement ``predict`` (and ``pack`` /
    ``unpack`` where the transformer reads tokens)."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # model_index.json's _class_name values of this family
    denoiser_key: str = ""  # the folder and adapter-key prefix of the denoiser: "unet" / "transformer"
    denoiser_class: str = ""  # diffusers class name
    default_targets: tuple[str, ...] = ()  # peft target_modules suffixes, as the family's trainers use them
    # which row sharing of the fused call (docs/design.md, "Sharing work between rows") is sound: a UNet's
    # captions enter only at cross-attention ("prefix", "twins"); an MMDiT's text enters every block (none)
    sharing: tuple[str, ...] = ()
    # whether catfast's RowAttnProcessor (diffusers' AttnProcessor2_0 call, UNet attention modules) may stand
    # in for the attention processors of a row-planned call; joint-attention processors (Flux, SD3, Qwen-Image)
    # take other arguments, so there the attention core runs on every row as the model's own processor does
    row_attention: bool = False
    flow: FlowRecipe | None = None  # None: a DDPM (epsilon / v) family
    sampling: SamplingRecipe | None = None  # flow families: how their pipeline samples
    patch: int = 1  # latent pixels per token side
    packs_latents: bool = False  # whether the family packs latents into tokens itself (else the model patchifies)
    max_sequence_length: int = 77  # text tokens of a caption, the family pipeline's default

    def row_sharing(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The row sharing of ``sharing`` that is sound for this denoiser instance (default: all of it)."""
        return self.sharing

    def denoiser_type(self) -> type:
        import diffusers  # lazy: diffusers

        return getattr(diffusers, self.denoiser_class)

    def pipeline_class(self) -> str:
        """The class name of this family's diffusers pipeline (model_index.json's ``_class_name``)."""
        return self.pipeline_classes[0]

    def pipeline_type(self, **variant) -> type:
        """diffusers' pipeline class ``pipeline_class(**variant)``."""
        import diffusers  # lazy: diffusers

        return getattr(diffusers, self.pipeline_class(**variant))

    def predict(self, model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's prediction for ``latents`` ``[B, C, H, W]`` at ``sigmas`` ``[B]`` (flow families:
        in (0, 1]; DDPM families: integer timesteps), in the latents' layout."""
        raise NotImplementedError

    def encode_prompt(self, pipe, captions: list[str], *, max_sequence_length: int | None = None) -> Cond:
        """The condition dict of ``captions`` (batch-major, one row per caption) from the family's diffusers
        pipeline ``pipe``: its own ``encode_prompt``, no CFG rows, captions longer than ``max_sequence_length``
        (default: the pipeline's) truncated with the pipeline's warning."""
        raise NotImplementedError(f"{self.name}: catfast's UNet paths encode captions themselves")

    def encode_latents(self, vae, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training latents ``[B, C, H, W]`` of ``pixels`` ``[B, 3, H', W']`` in [-1, 1]: a sample of the VAE's
        posterior, shifted and scaled as the family's training scripts do (``(z - shift_factor) *
        scaling_factor``; SD's VAEs have no shift)."""
        z = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H', W']`` (about [-1, 1]) of latents ``[B, C, H, W]``: ``encode_latents``' scale and
        shift undone, then the VAE's decoder (what the family's pipeline does before postprocessing)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]

    def concat_conds(self, conds: list[Cond]) -> Cond:
        """One condition holding the rows of ``conds`` in order (a batched call over several captions' rows);
        their text lengths must agree (families whose encoders pad to a fixed length)."""
        lengths = {c["prompt_embeds"].shape[1] for c in conds}
        if len(lengths) > 1:
            raise ValueError(f"{self.name}: conditions of text lengths {sorted(lengths)} cannot share a call")
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}

    def latent_channels(self, model: torch.nn.Module) -> int:
        """Channels C of the latents ``[B, C, H, W]`` that ``predict`` takes for ``model``."""
        return model.config.in_channels // (self.patch**2 if self.packs_latents else 1)

    def example_cond(self, model: torch.nn.Module, batch: int, tokens: int, generator=None) -> Cond:
        """Random conditions of ``batch`` rows and ``tokens`` text tokens in the shapes ``model`` takes (N(0, 1)
        states: for benchmarks and tests that need no text encoder)."""
        width = model.config.joint_attention_dim
        cond = {"prompt_embeds": torch.randn(batch, tokens, width, generator=generator)}
        pooled = getattr(model.config, "pooled_projection_dim", None)
        if pooled is not None:
            cond["pooled_prompt_embeds"] = torch.randn(batch, pooled, generator=generator)
        return cond

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Transformer image tokens of ``latents`` ``[B, C, H, W]`` (what the dynamic shift reads)."""
        return (latents.shape[-2] // self.patch) * (latents.shape[-1] // self.patch)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with every peft LoRA layer switched off (its frozen base alone), then restore each
    layer's own on/off state: the CAT teacher is the same model, not a copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, before):
            m.enable_adapters(not was_disabled)


@contextlib.contextmanager
def pipeline_warnings(pipe) -> Iterator[None]:
    """Within the block, the warnings of ``pipe``'s own module reach the user even where catfast's command line
    lowers diffusers' logging to errors: a caption cut at ``max_sequence_length`` says so, as in diffusers."""
    logger = logging.getLogger(type(pipe).__module__)
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


def first_output(out: Any) -> torch.Tensor:
    """The sample tensor of a diffusers model output (``return_dict=False`` tuple)."""
    return out[0] if isinstance(out, tuple) else out.sample
