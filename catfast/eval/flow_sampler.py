"""One batched flow-matching Euler sampler over rows that use different adapters, for diffusion transformers
(FLUX.1, SD3/3.5, Qwen-Image: the flow families of ``catfast.integrations.families``).

Row i of ``sample_flow_latents`` is (prompt i, peft adapter i or the base model, seed i). Every transformer
call carries all rows at once through catfast's row-planned layers (``integrations.row_call``): with CFG the
uncond half then the cond half, both rows of a sample on that sample's adapter. Each row's result equals the
family's diffusers pipeline run for that row alone (``generator=torch.Generator().manual_seed(seed)``, the
same steps, guidance and size), because each step reproduces the pipeline's math:

- timesteps: ``FlowMatchEulerDiscreteScheduler`` from the pipeline's scheduler config; Flux and Qwen-Image
  pass ``sigmas = linspace(1, 1/steps, steps)`` and ``mu = calculate_shift(image tokens, ...)`` (the
  resolution shift), SD3 the scheduler's own grid (static shift; ``mu`` only under dynamic shifting);
- guidance: Flux feeds it to the guidance embedding (guidance-distilled, no CFG rows; ignored by a model
  without one); SD3 runs CFG rows with the negative prompt when guidance > 1; Qwen-Image runs its true CFG
  (``true_cfg_scale`` with a negative prompt) and rescales the guided velocity to the cond velocity's
  per-token norm, as ``QwenImagePipeline`` does;
- noise: the pipeline's ``randn_tensor`` on the CPU generator of the row's seed, in the transformer's dtype.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from catfast.errors import CatfastError
from catfast.eval.sampler import NonFiniteLatents, _row_order, nonfinite_rows, per_sample_scales, sampling_plan
from catfast.integrations.families import family_of
from catfast.integrations.row_call import planned_unet
from catfast.integrations.schedulers import flow_sampling_scheduler


def sample_flow_latents(
    pipe,
    prompts: list[str],
    *,
    adapters: list[str | None],
    seeds: list[int],
    steps: int = 28,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    scale: float | list[float] = 1.0,
    max_sequence_length: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Final latents ``[N, C, H/f, W/f]`` (the family's unpacked VAE layout, f = ``pipe.vae_scale_factor``)
    of ``prompts[i]`` on peft adapter ``adapters[i]`` of ``pipe.transformer`` (None = the base model) from the
    noise of ``seeds[i]``.

    pipe: a loaded FluxPipeline / StableDiffusion3Pipeline / QwenImagePipeline (its text encoders, scheduler
    config and transformer are used; the pipeline's scheduler is not touched). steps: Euler steps; guidance:
    Flux's embedded guidance, SD3's CFG scale, Qwen-Image's ``true_cfg_scale`` (None: the pipeline's default;
    CFG families run cond rows only when <= 1); height, width: pixels, multiples of ``vae_scale_factor * 2``
    (default: the pipeline's); negative_prompt: the uncond caption of CFG families (default: the pipeline's,
    "" for SD3, " " for Qwen-Image); scale: LoRA scale of every adapter row, or one per sample (a server's requests
    ask for different weights); max_sequence_length: text tokens
    (default: the pipeline's). The transformer is patched for the call when it was not (and unpatched after)."""
    n = len(prompts)
    if isinstance(prompts, str) or len(adapters) != n or len(seeds) != n:
        raise CatfastError(
            f"prompts, adapters and seeds must be lists of equal length, got {n}, {len(adapters)}, {len(seeds)}"
        )
    if steps < 1:
        raise CatfastError(f"steps must be >= 1, got {steps}")
    family = family_of(pipe)
    if family.sampling is None:
        raise CatfastError(f"{family.name} is not a flow-matching transformer family; use catfast.eval.sampler")
    model = pipe.transformer
    configs = getattr(model, "peft_config", None) or {}
    scale = per_sample_scales(scale, n)
    missing = [a for a in adapters if a is not None and a not in configs]
    if missing:
        raise CatfastError(f"the transformer has no adapter named {missing[0]!r} (it has {list(configs) or 'none'})")
    height, width = _size(pipe, height, width)
    if n == 0:
        return torch.empty(0, family.latent_channels(model), height, width)
    with planned_unet(model, adapters, purpose="sample") as call:
        return _sample(
            pipe, family, call, list(prompts), call.slots(adapters), seeds, steps=steps,
            guidance=family.sampling.guidance_default if guidance is None else float(guidance),
            height=height, width=width, negative_prompt=negative_prompt, scale=scale,
            max_sequence_length=max_sequence_length, progress=progress,
        )  # fmt: skip


def sample_flow_images(pipe, prompts: list[str], **kwargs) -> tuple[list, torch.Tensor]:
    """``(images, latents)``: one PIL image per row, decoded by ``family.decode_latents`` and the pipeline's
    own postprocessing, and ``sample_flow_latents(pipe, prompts, **kwargs)``'s latents."""
    latents = sample_flow_latents(pipe, prompts, **kwargs)
    family, vae = family_of(pipe), pipe.vae
    images = []
    with torch.no_grad():
        for row in latents:  # one at a time: the VAE decoder's activations dominate memory at full size
            pixels = family.decode_latents(vae, row[None].to(vae.device))
            images += pipe.image_processor.postprocess(pixels, output_type="pil")
    return images, latents


def _size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """Latent (height, width) of an image of ``height`` x ``width`` pixels; refuses sides the pipelines would
    round down (2x2 packing or patches after the VAE's factor)."""
    factor = pipe.vae_scale_factor
    multiple = factor * 2
    default = pipe.default_sample_size * factor
    height, width = height or default, width or default
    if height % multiple or width % multiple:
        raise CatfastError(
            f"height and width must be multiples of {multiple} (the VAE's factor {factor} x 2x2 patches), "
            f"got {height} x {width}"
        )
    return height // factor, width // factor


@torch.no_grad()
def _sample(pipe, family, call, prompts, slots, seeds, *, steps, guidance, height, width, negative_prompt, scale,
            max_sequence_length, progress) -> torch.Tensor:  # fmt: skip
    """One run over all rows; slots None = a transformer without adapters (base rows only, no plan)."""
    model = call.unet
    recipe = family.sampling
    # one parameter's device and dtype: diffusers' ModelMixin.device walks every module (about half of a served
    # DiT's per-run setup at 64 resident adapters, profiled by the serve bench)
    weight = next(model.parameters())
    n, device, dtype = len(prompts), weight.device, weight.dtype
    negative = recipe.negative_default if negative_prompt is None else negative_prompt
    cfg = recipe.guidance != "embed" and guidance > 1.0 and negative is not None

    # captions: each distinct prompt once, the negative first (rows index into them)
    unique = list(dict.fromkeys(prompts))
    texts = ([negative] if cfg else []) + unique
    encoded = family.encode_prompt(pipe, texts, max_sequence_length=max_sequence_length)
    encoded = family.concat_conds([encoded])  # Qwen-Image: a mask on every row, even when none is padded
    caption = [(1 if cfg else 0) + unique.index(p) for p in prompts]

    # the pipelines' prepare_latents: randn_tensor on each row's CPU generator, [1, C, h, w] (Qwen-Image's
    # [1, 1, C, h, w] draws the same numbers), in the text states' dtype (the transformer's here)
    shape = (1, family.latent_channels(model), height, width)
    latents = torch.cat(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    ).to(device)
    scheduler = flow_sampling_scheduler(pipe.scheduler.config, steps, family.image_seq_len(latents),
                                        flow_sigmas=recipe.flow_sigmas, max_shift=recipe.max_shift, device=device)

    order, identical = _row_order(slots, cfg)
    index = torch.tensor(order, device=device)
    rows = torch.tensor([0 if cfg and k < n else caption[i] for k, i in enumerate(order)], device=device)
    cond = {k: v[rows.to(v.device)].to(device) for k, v in encoded.items()}
    if recipe.guidance == "embed":  # the guidance embedding's input, this run's value on every row
        cond["guidance"] = torch.full((len(order),), float(guidance), device=device)
    plan = sampling_plan(slots, order, scale, device)
    timesteps = scheduler.timesteps
    if progress:
        timesteps = tqdm(timesteps, desc="sampling", unit="step")
    for t in timesteps:
        # the pipelines' transformer timestep: t (= 1000 sigma) in the latents' dtype, / 1000 (the family's
        # predict scales it back for SD3)
        sigmas = t.expand(len(order)).to(dtype) / 1000
        with call.plan_rows(plan, identical_groups=2 if identical else 1):
            out = family.predict(model, latents[index], sigmas, cond)
        text = torch.empty_like(latents, dtype=out.dtype).index_copy_(0, index[-n:], out[-n:])
        pred = text
        if cfg:
            uncond = torch.empty_like(text).index_copy_(0, index[:n], out[:n])
            pred = uncond + guidance * (text - uncond)
            if recipe.guidance == "cfg_norm":  # QwenImagePipeline: each token's guided velocity at the cond norm
                packed = family.pack(pred)
                ratio = family.pack(text).norm(dim=-1, keepdim=True) / packed.norm(dim=-1, keepdim=True)
                pred = family.unpack(packed * ratio, height, width)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    bad = nonfinite_rows(latents)
    if bad:
        raise NonFiniteLatents(
            f"sampling ended with NaN/Inf latents in {len(bad)} of {n} rows (prompt {prompts[bad[0]]!r}): no picture "
            f"to decode. Likely causes: guidance {guidance:g} too high, an adapter out of proportion to the base "
            f"(LoRA scale {scale[bad[0]]:g}), or a base model whose weights hold NaN/Inf"
        )
    return latents

