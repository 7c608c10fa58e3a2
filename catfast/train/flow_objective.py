"""The CAT objective for flow-matching diffusion transformers (Flux, SD3, Qwen-Image).

Semantics (docs/method.md's CAT, with rectified flow in place of DDPM), for B samples sharing x0, noise and
sigma (each sample its own sigma in (0, 1]):
  x_t    = (1 - sigma) x0 + sigma noise
  target = noise - x0                                                  the rectified-flow velocity
  L_LDM  = mean_b w_b mse_b(v_{W+dW}(x_t, sigma, c ), target)           adapter, trigger caption
  L_CAT  = mean_b w_b mse_b(v_{W+dW}(x_t, sigma, c-), sg(v_W(x_t, sigma, c-)))   adapter vs frozen base
  L      = L_LDM + cat_weight * L_CAT + sum_k w_k L_k
  L_k    = mean_b w_b mse_b(v_{W+dW}(x_t, sigma, p_k), sg(v_W(x_t, sigma, p_k)))   ``preserve``: more held prompts
  L_bank = mean_j w_j mse_j(v_{W+dW}(xb_t, sigma_j, c_j), noise_j - xb_j)   ``bank`` (weight bank.weight)
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
    bank: torch.Tensor | None = None  # L_bank, detached (None without bank rows)


@dataclass
class BankRows:
    """Knowledge-bank rows of one step (``catfast.train.flow_bank``): base-model samples replayed with fresh noise,
    their own sigmas and the true velocity as target, on the adapter (no teacher row), weighted by ``weight``."""

    latents: torch.Tensor  # [Nb, C, H, W], the concept latents' shape
    noise: torch.Tensor  # [Nb, C, H, W]
    sigmas: torch.Tensor  # [Nb]
    cond: Cond  # Nb rows of the bank prompts' conditions
    weight: float


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
    bank: BankRows | None = None,
    mode: str = "reference",
    layout: str = "one-call",
) -> FlowLossOutput:
    """L for one batch (module docstring). ``model``: the family's transformer with a peft LoRA attached
    (the active adapter trains); ``cond`` / ``cond_stripped``: the family's condition dicts for the trigger
    and the stripped captions (``cond_stripped`` is needed only when ``cat_weight > 0``); ``preserve``: more
    (condition of B rows, weight) groups whose prompts the adapter must leave as the base has them (extra CAT
    prompts, kept adapters' prompts: ``flow_trainer``), each one more student and one more teacher row per
    sample in the same calls; ``bank``: knowledge-bank rows (``BankRows``), adapter rows with the true
    velocity as target, in the same call too; ``mode``: one of ``MODES``; ``layout``: the fused mode's, one of
    ``LAYOUTS``."""
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
    if not held and bank is None:
        pred = family.predict(model, noisy, sigmas, cond)
        ldm = _weighted_mse(pred, target, weights)
        return FlowLossOutput(loss=ldm, ldm=ldm.detach(), cat=None, sigmas=sigmas)
    # adapter row groups: the concept, each held group's students, the bank's rows; teacher groups: each held one
    students = [(noisy, sigmas, cond)] + [(noisy, sigmas, c) for c, _ in held]
    if bank is not None:
        bank_noisy, bank_target = noisy_and_target(bank.latents, bank.noise, bank.sigmas)
        students.append((bank_noisy, bank.sigmas, bank.cond))
    teachers = [(noisy, sigmas, c) for c, _ in held]
    if mode == "fused":
        adapter_out, teacher_out = _fused_predictions(family, model, students, teachers, layout)
    else:
        adapter_out = [family.predict(model, *group) for group in students]
        with torch.no_grad(), lora_disabled(model):
            teacher_out = [family.predict(model, *group) for group in teachers]
    ldm = _weighted_mse(adapter_out[0], target, weights)
    terms = [_weighted_mse(s, t.float(), weights) for s, t in zip(adapter_out[1 : 1 + len(held)], teacher_out)]
    loss = ldm + sum(w * term for (_, w), term in zip(held, terms))
    bank_term = None
    if bank is not None:
        bank_weights = family.flow.loss_weights(bank.sigmas.float().to(latents.device))
        bank_term = _weighted_mse(adapter_out[-1], bank_target, bank_weights)
        loss = loss + bank.weight * bank_term
        bank_term = bank_term.detach()
    cat = terms[0].detach() if cat_weight > 0 else None
    preserved = tuple(t.detach() for t in terms[len(held) - len(preserve) :])
    return FlowLossOutput(loss=loss, ldm=ldm.detach(), cat=cat, sigmas=sigmas, preserved=preserved, bank=bank_term)


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


def _fused_predictions(family: DenoiserFamily, model, students: list[tuple], teachers: list[tuple], layout: str):
    """(the adapter's prediction per ``students`` group, the detached base's per ``teachers`` group), each group
    ``(x_t, sigmas, cond)``, from row-planned calls in ``layout``: one-call rows ``[students | teachers]``, the
    teacher rows without gradients; teacher-first a no_grad call of the teacher rows, then one of the students."""
    device = students[0][0].device
    with planned_unet(model, [], purpose="fused", error=ValueError) as call:
        active = active_adapters(model)  # read once patched: unpatched, diffusers walks the module tree for it
        if len(active) != 1:
            raise ValueError(f"fused CAT trains one adapter; the transformer has active adapters {active}")
        n_student, n_teacher = (sum(g[0].shape[0] for g in groups) for groups in (students, teachers))
        adapter_slots = call.slots(active * n_student)
        if layout == "teacher-first":
            teacher_out = []
            if teachers:
                plan = RowPlan.build([NO_ADAPTER] * n_teacher, needs_grad=False, device=device)
                with torch.no_grad(), call.plan_rows(plan):
                    teacher_out = _call(family, model, teachers)
            with call.plan_rows(RowPlan.build(adapter_slots, device=device)):
                return _call(family, model, students), teacher_out
        slots = adapter_slots + [NO_ADAPTER] * n_teacher
        plan = RowPlan.build(slots, needs_grad=[True] * n_student + [False] * n_teacher, device=device)
        with call.plan_rows(plan):
            out = _call(family, model, students + teachers)
    return out[: len(students)], [t.detach() for t in out[len(students) :]]


def _call(family: DenoiserFamily, model, groups: list[tuple]) -> list[torch.Tensor]:
    """One transformer call over the rows of ``groups`` ``(x_t, sigmas, cond)``; the prediction of each group."""
    out = family.predict(model, torch.cat([g[0] for g in groups]), torch.cat([g[1] for g in groups]),
                         family.concat_conds([g[2] for g in groups]))  # fmt: skip
    return list(out.split([g[0].shape[0] for g in groups]))
