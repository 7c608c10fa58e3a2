"""One batched DDIM + classifier-free-guidance sampler over rows that use different adapters.

Row i of ``sample_images`` is (prompt i, adapter i or the base model, seed i). Every UNet call carries
all 2N rows at once, the uncond half then the cond half: both rows of a sample use that sample's adapter
slot (the uncond row with the empty prompt), through catfast's row-planned layers
(``catfast.integrations.patch``), so base and adapter rows share each launch. Each row's result equals
diffusers' ``StableDiffusionPipeline`` run for that row alone with a DDIM scheduler built from the same
config, ``eta=0``, ``torch.Generator().manual_seed(seed)`` and the same steps and guidance.
"""

from __future__ import annotations

import torch
from PIL import Image
from tqdm.auto import tqdm

from catfast.errors import CatfastError
from catfast.integrations.models import encode_prompt
from catfast.integrations.row_call import planned_unet
from catfast.integrations.schedulers import sampling_scheduler
from catfast.rows import NO_ADAPTER, RowPlan


def sample_images(
    base,
    prompts: list[str],
    *,
    adapters: list[str | None],
    seeds: list[int],
    steps: int = 25,
    guidance: float = 7.5,
    scale: float = 1.0,
    size: int | None = None,
    progress: bool = False,
    max_rows: int | None = None,
    output: str = "images",
) -> list:
    """Generate one PIL image per row: ``prompts[i]`` on peft adapter ``adapters[i]`` of ``base.unet``
    (None = the base model, adapters off) from the initial noise of ``seeds[i]``.

    steps: DDIM steps (eta 0); guidance: CFG scale (<= 1 runs the cond rows only); scale: LoRA scale of
    every adapter row (diffusers' ``cross_attention_kwargs={"scale": scale}``); size: image side in
    pixels (default the UNet's native size; a multiple of the VAE factor); max_rows: at most this many
    samples per sampler run (memory), None = all rows in one run; output: "images" (PIL) or "latents"
    (one ``[C, h, w]`` tensor per row, the final latents before the VAE decode). The UNet is patched for the call when
    it was not (and unpatched after), or used with the slots it is patched with. Images are decoded by
    ``base.vae`` on its own device, prompts encoded on the text encoder's. NonFiniteLatents (naming the
    likely causes) when the final latents hold NaN or Inf, instead of black pictures.
    """
    n = len(prompts)
    if isinstance(prompts, str) or len(adapters) != n or len(seeds) != n:
        raise ValueError(
            f"prompts, adapters and seeds must be lists of equal length, got {n}, {len(adapters)}, {len(seeds)}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    if base.text_encoder is None or base.vae is None:
        raise CatfastError("sampling needs the base model's text encoder and VAE, but they were released")
    if n == 0:
        return []
    unet = base.unet
    if isinstance(unet, torch.nn.parallel.DistributedDataParallel):
        unet = unet.module  # sampling runs on one rank: the wrapper would sync buffers across ranks
    chunk = n if max_rows is None else max(1, int(max_rows))
    with planned_unet(unet, adapters, purpose="sample") as call:
        images = []
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            images += _sample(
                base,
                call,
                prompts[rows],
                call.slots(adapters[rows]),
                seeds[rows],
                steps=steps,
                guidance=guidance,
                scale=scale,
                size=size,
                progress=progress,
                decode=output == "images",
            )
    return images


@torch.no_grad()
def _sample(base, call, prompts, slots, seeds, *, steps, guidance, scale, size, progress, decode=True) -> list:
    """One sampler run over len(prompts) samples; slots None = unpatched UNet (base rows only)."""
    unet = call.unet
    n, device, dtype = len(prompts), unet.device, unet.dtype
    factor = base.vae_scale_factor
    side = size if size is not None else unet.config.sample_size * factor
    if side % factor:
        raise ValueError(f"size {side} is not a multiple of the VAE factor {factor}")
    cfg = guidance > 1.0  # diffusers' do_classifier_free_guidance
    cond = _conditions(base, list(prompts), side, cfg, device, dtype)
    # diffusers' prepare_latents with one CPU generator per row: each row's noise is what a
    # one-row pipeline call with torch.Generator().manual_seed(seed) draws.
    shape = (1, unet.config.in_channels, side // factor, side // factor)
    latents = torch.cat(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    ).to(device)
    scheduler = sampling_scheduler("DDIMScheduler", base.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    order, identical = _row_order(slots, cfg)
    index = torch.tensor(order, device=device)
    cond = _take(cond, torch.tensor([i + (n if cfg and k >= n else 0) for k, i in enumerate(order)], device=device))
    plan = sampling_plan(slots, order, scale, device)
    timesteps = scheduler.timesteps
    if progress:
        timesteps = tqdm(timesteps, desc="sampling", unit="step")
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents[index], t)
        with call.plan_rows(plan, identical_groups=2 if identical else 1):
            out = unet(model_input, t, **cond, return_dict=False)[0]
        pred = torch.empty_like(latents).index_copy_(0, index[:n], out[:n])
        if cfg:
            text = torch.empty_like(latents).index_copy_(0, index[n:], out[n:])
            pred = pred + guidance * (text - pred)
        latents = scheduler.step(pred, t, latents, eta=0.0, return_dict=False)[0]
    bad = nonfinite_rows(latents)
    if bad:
        raise NonFiniteLatents(
            f"sampling ended with NaN/Inf latents in {len(bad)} of {n} rows (prompt {prompts[bad[0]]!r}): no picture "
            f"to decode. Likely causes: guidance {guidance:g} too high, an adapter out of proportion to the base "
            f"(LoRA scale {scale:g}), or a base model whose weights hold NaN/Inf"
        )
    return decode_latents(base, latents) if decode else list(latents.float().cpu().unbind(0))


class NonFiniteLatents(CatfastError):
    """A sampler run ended with NaN or Inf in its latents (decoded, they are black pictures)."""


def nonfinite_rows(latents: torch.Tensor) -> list[int]:
    """The rows of final latents ``[N, ...]`` that hold NaN or Inf. One reduction and one host read, made
    once after the last step (a check per step would synchronise the device every step)."""
    return (~torch.isfinite(latents).flatten(1).all(dim=1)).nonzero().flatten().tolist()


def per_sample_scales(scale: float | list[float], n: int) -> list[float]:
    """``n`` samples' LoRA scales from one scale for all or one per sample; CatfastError when the list does not
    have one per sample."""
    if isinstance(scale, (int, float)):
        return [float(scale)] * n
    if len(scale) != n:
        raise CatfastError(f"scale: one per sample ({n}), got {len(scale)}")
    return [float(x) for x in scale]


def sampling_plan(slots: list, order: list[int], scale: float | list[float], device) -> RowPlan | None:
    """The no-grad row plan of a sampler run: rows in ``order``, each its slot (``slots[i]``) at LoRA ``scale``
    (one for every sample, or ``scale[i]`` per sample; base rows 0); None for a model without adapters
    (``slots[0] is None``: no plan, plain calls)."""
    if slots[0] is None:
        return None
    per_sample = per_sample_scales(scale, len(slots))
    scales = [0.0 if slots[i] == NO_ADAPTER else per_sample[i] for i in order]
    row_slots = [slots[i] for i in order]
    return RowPlan.build(row_slots, scales, needs_grad=False, device=device)


def _row_order(slots: list, cfg: bool) -> tuple[list[int], bool]:
    """The sample of each UNet row, and whether the rows are two identical groups (CFG's uncond and cond
    halves in the same sample order). Samples are ordered base first, then by adapter slot, and with CFG
    a half that mixes base and adapter samples is mirrored in the cond half ([base, adapter | adapter,
    base]): the adapter rows then form one contiguous run, which the row-planned op adds in place instead
    of scattering (index_add_ took ~30% of a tiny-model sampling run on the dev CPU)."""
    samples = sorted(range(len(slots)), key=lambda i: -2 if slots[i] is None else slots[i])
    if not cfg:
        return samples, False
    base = [i for i in samples if slots[i] is None or slots[i] == NO_ADAPTER]
    if not base or len(base) == len(samples):
        return samples * 2, True
    adapter = samples[len(base) :]
    return base + adapter + adapter + base, False


def _take(cond: dict, index: torch.Tensor) -> dict:
    """The UNet keyword arguments with every tensor's rows reordered by ``index``."""
    return {k: _take(v, index) if isinstance(v, dict) else v[index] for k, v in cond.items()}


def _conditions(base, prompts: list[str], side: int, cfg: bool, device, dtype) -> dict:
    """UNet keyword arguments for [uncond rows | cond rows] (cond rows only without CFG). The uncond
    condition is the empty prompt (SD), or zeros for SDXL (its pipelines' force_zeros_for_empty_prompt)."""

    cond = encode_prompt(base, prompts, image_size=(side, side) if base.is_sdxl else None)
    if not base.is_sdxl:
        hidden = cond.to(device, dtype)
        if cfg:
            empty = encode_prompt(base, [""]).to(device, dtype)
            hidden = torch.cat([empty.expand_as(hidden), hidden])
        return {"encoder_hidden_states": hidden}
    hidden = cond["encoder_hidden_states"].to(device, dtype)
    added = {k: v.to(device, dtype) for k, v in cond["added_cond_kwargs"].items()}
    if cfg:
        hidden = torch.cat([torch.zeros_like(hidden), hidden])
        added = {
            "text_embeds": torch.cat([torch.zeros_like(added["text_embeds"]), added["text_embeds"]]),
            "time_ids": torch.cat([added["time_ids"]] * 2),
        }
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}


def decode_latents(base, latents: torch.Tensor) -> list:
    """PIL images of the latents: VAE decode, then diffusers' postprocess ([-1, 1] -> uint8, rounded)."""

    vae = base.vae
    images = []
    for row in latents:  # one at a time: the VAE decoder's activations dominate memory at full size
        z = row.unsqueeze(0).to(vae.device, vae.dtype) / vae.config.scaling_factor
        x = vae.decode(z, return_dict=False)[0]
        x = (x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
        images.append(Image.fromarray((x * 255).round().astype("uint8")))
    return images
