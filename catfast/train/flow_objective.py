"""The CAT objective for flow-matching diffusion transformers (Flux, SD3, Qwen-Image).

Semantics (docs/method.md's CAT, with rectified flow in place of DDPM), for B samples sharing x0, noise and
sigma (each sample its own sigma in (0, 1]):
  x_t    = (1 - sigma) x0 + sigma noise
  target = noise - x0                                                  the rectified-flow velocity
  L_LDM  = mean_b w_b mse_b(v_{W+dW}(x_t, sigma, c ), target)           adapter, trigger caption
  L_CAT  = mean_b w_b mse_b(v_{W+dW}(x_t, sigma, c-), sg(v_W(x_t, sigma, c-)))   adapter vs frozen base
  L      = L_LDM + cat_weight * L_CAT + sum_k w_k L_k
  L_k    = mean_b w_b mse_b(v_{W+dW}(x_t, sigma, p_k), sg(v_W(x_t, sigma, p_k)))   ``preserve``: more held prompts
w: the family recipe's loss weighting (``compute_loss_weighting_for_sd3``; "none": 1). The base v_W is the same
transformer with its LoRA switched off under no_grad (``families.lora_disabled``), never a second model;
``cat_weight == 0`` runs the plain LoRA step (one forward). The family (``integrations.families``) hides the
transformer's inputs: packing, position ids, timestep scaling, Flux's guidance embedding. Losses are reduced
in fp32 whatever the transformer's dtype. Latents are ``[B, C, H, W]``, scaled and shifted as the VAE's
``(z - shift_factor) * scaling_factor``.

Modes (same losses and gradients, fp32 within rounding):
- "reference": three transformer calls of B rows, as the official CAT code runs them (adapter on c, frozen base
  on c- under no_grad, adapter on c-);
- "fused": the rows under a row plan (``integrations.row_call``), in one of two layouts:
  - "one-call" (default): one call of 3B rows ``[c | c- | c-]``: the LoRA layers add the adapter to the first
    2B rows only, and the frozen layers compute no input gradient for the B teacher rows. A transformer's
    text enters every block, so no rows are shared (the family declares it, ``DenoiserFamily.sharing``), and
    the joint attention core and the elementwise layers run, and save for backward, on every row: 0.40x the
    reference's launching ops, 1.55x its saved bytes (``bench dit-step``, flux-narrow);
  - "teacher-first": a no_grad call of the B teacher rows, then one call of the 2B adapter rows: the teacher
    rows save nothing and spend no backward work (the reference's saved bytes), at about twice one-call's
    launching ops (still fewer than the reference's three calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from catfast.integrations.families import Cond, DenoiserFamily, lora_disabled
from catfast.integrations.patch import active_adapters
from catfast.integrations.row_call import planned_unet
from catfast.rows import NO_ADAPTER, RowPlan, tensor_to_device

MODES = ("reference", "fused")
LAYOUTS = ("one-call", "teacher-first")


@dataclass
class FlowLossOutput:
    loss: torch.Tensor  # L (fp32 scalar, carries the graph)
    ldm: torch.Tensor  # L_LDM, detached
    cat: torch.Tensor | None  # L_CAT, detached (None when cat_weight == 0)
    sigmas: torch.Tensor  # [B], the sigmas used
    preserved: tuple[torch.Tensor, ...] = ()  # L_k of each ``preserve`` group, detached


def sample_flow_inputs(
    family: DenoiserFamily, latents: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise, sigmas)`` for one training batch by the family's recipe: noise ``N(0, I)`` like ``latents``,
    sigmas ``[B]`` (``FlowRecipe.sample_sigmas`` at this resolution's token count)."""
    sigmas = family.flow.sample_sigmas(latents.shape[0], family.image_seq_len(latents), generator=generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    return tensor_to_device(noise, latents.device).to(latents.dtype), tensor_to_device(sigmas, latents.device)


def flow_cat_loss(
    family: DenoiserFamily,
    model: torch.nn.Module,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond,
    cond_stripped: Cond | None = None,
    *,
    cat_weight: float = 1.0,
    preserve: Sequence[tuple[Cond, float]] = (),
    mode: str = "reference",
    layout: str = "one-call",
) -> FlowLossOutput:
    """L for one batch (module docstring). ``model``: the family's transformer with a peft LoRA attached
    (the active adapter trains); ``cond`` / ``cond_stripped``: the family's condition dicts for the trigger
    and the stripped captions (``cond_stripped`` is needed only when ``cat_weight > 0``); ``preserve``: more
    (condition of B rows, weight) groups whose prompts the adapter must leave as the base has them (extra CAT
    prompts, kept adapters' prompts: ``flow_trainer``), each one more student and one more teacher row per
    sample in the same calls; ``mode``: one of ``MODES``; ``layout``: the fused mode's, one of ``LAYOUTS``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if family.flow is None:
        raise ValueError(f"family {family.name} is not a flow-matching family")
    if cat_weight < 0:
        raise ValueError(f"cat_weight must be >= 0, got {cat_weight}")
    if cat_weight > 0 and cond_stripped is None:
        raise ValueError("cat_weight > 0 needs the stripped caption's condition (cond_stripped)")
    if sigmas.shape != (latents.shape[0],) or noise.shape != latents.shape:
        raise ValueError(f"noise {tuple(noise.shape)} / sigmas {tuple(sigmas.shape)} do not fit {tuple(latents.shape)}")
    noisy, target = noisy_and_target(latents, noise, sigmas)
    weights = family.flow.loss_weights(sigmas.float().to(latents.device))  # on the device: no copy back to the host

    held = ([(cond_stripped, cat_weight)] if cat_weight > 0 else []) + list(preserve)
    if any(w < 0 for _, w in preserve):
        raise ValueError(f"preserve weights must be >= 0, got {[w for _, w in preserve]}")
    if not held:
        pred = family.predict(model, noisy, sigmas, cond)
        ldm = _weighted_mse(pred, target, weights)
        return FlowLossOutput(loss=ldm, ldm=ldm.detach(), cat=None, sigmas=sigmas)
    groups = [c for c, _ in held]
    if mode == "fused":
        pred, students, teachers = _fused_predictions(family, model, noisy, sigmas, cond, groups, layout)
    else:
        pred = family.predict(model, noisy, sigmas, cond)
        with torch.no_grad(), lora_disabled(model):
            teachers = [family.predict(model, noisy, sigmas, c) for c in groups]
        students = [family.predict(model, noisy, sigmas, c) for c in groups]
    ldm = _weighted_mse(pred, target, weights)
    terms = [_weighted_mse(s, t.float(), weights) for s, t in zip(students, teachers)]
    loss = ldm + sum(w * term for (_, w), term in zip(held, terms))
    cat = terms[0].detach() if cat_weight > 0 else None
    preserved = tuple(t.detach() for t in terms[len(held) - len(preserve) :])
    return FlowLossOutput(loss=loss, ldm=ldm.detach(), cat=cat, sigmas=sigmas, preserved=preserved)


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean over samples of ``weights[b] * mean((pred[b] - target[b])^2)``, in fp32 (the diffusers scripts'
    reduction)."""
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
    return (weights * per_sample).mean()


def noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """``(x_t, v)``: ``x_t = (1 - sigma) x0 + sigma noise`` in the latents' dtype and the rectified-flow velocity
    ``noise - x0`` in fp32, for latents and noise ``[B, C, H, W]`` and sigmas ``[B]``."""
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
    noisy = ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)
    return noisy, noise.float() - latents.float()


def _fused_predictions(family: DenoiserFamily, model, noisy, sigmas, cond: Cond, groups: list[Cond], layout: str):
    """(adapter on c, [adapter on g for g in groups], [detached base on g]) from row-planned calls in
    ``layout``: one-call rows ``[c | g_1 .. g_k | g_1 .. g_k]`` (adapter, adapter, base), teacher-first a no_grad
    call of the k base groups, then one of the 1 + k adapter groups."""
    batch, k = noisy.shape[0], len(groups)
    with planned_unet(model, [], purpose="fused", error=ValueError) as call:
        active = active_adapters(model)  # read once patched: unpatched, diffusers walks the module tree for it
        if len(active) != 1:
            raise ValueError(f"fused CAT trains one adapter; the transformer has active adapters {active}")
        adapter_slots = call.slots(active * (1 + k) * batch)
        if layout == "teacher-first":
            plan = RowPlan.build([NO_ADAPTER] * k * batch, needs_grad=False, device=noisy.device)
            with torch.no_grad(), call.plan_rows(plan):
                teachers = family.predict(model, torch.cat([noisy] * k), torch.cat([sigmas] * k),
                                          family.concat_conds(groups)).chunk(k)  # fmt: skip
            with call.plan_rows(RowPlan.build(adapter_slots, device=noisy.device)):
                out = family.predict(model, torch.cat([noisy] * (1 + k)), torch.cat([sigmas] * (1 + k)),
                                     family.concat_conds([cond, *groups]))  # fmt: skip
            pred, *students = out.chunk(1 + k)
            return pred, students, list(teachers)
        slots = adapter_slots + [NO_ADAPTER] * k * batch
        plan = RowPlan.build(slots, needs_grad=[True] * (1 + k) * batch + [False] * k * batch, device=noisy.device)
        rows = family.concat_conds([cond, *groups, *groups])
        with call.plan_rows(plan):
            out = family.predict(model, torch.cat([noisy] * (1 + 2 * k)), torch.cat([sigmas] * (1 + 2 * k)), rows)
    pred, *rest = out.chunk(1 + 2 * k)
    return pred, rest[:k], [t.detach() for t in rest[k:]]
