"""The CAT objective (Contrastive Adapter Training, arXiv 2404.07554), as a function of one batch.

Semantics (docs/method.md, §1), for B samples sharing z0, eps and t:
  z_t    = scheduler.add_noise(z0, eps, t)
  target = eps (epsilon models) or scheduler.get_velocity(z0, eps, t) (v-prediction)
  L_LDM  = mse(unet_{W+dW}(z_t, t, c ), target)                      adapter, trigger caption
  L_CAT  = mse(unet_{W+dW}(z_t, t, c-), sg(unet_W(z_t, t, c-)))      adapter vs frozen base, stripped caption
  L      = L_LDM + cat_weight * L_CAT
With ``snr_gamma``, both terms are min-SNR weighted per sample: min(SNR_t, gamma) / SNR_t for epsilon
and min(SNR_t, gamma) / (SNR_t + 1) for v-prediction (the diffusers training scripts' convention).
Losses are reduced in fp32 whatever the UNet's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F

from catfast.integrations.patch import active_adapters, patch_report
from catfast.integrations.patch import fused_blocker as _fused_blocker
from catfast.integrations.row_call import planned_unet
from catfast.rows import NO_ADAPTER, RowPlan

# A text condition: encoder hidden states [B, L, D], or for SDXL-style UNets a dict with
# "encoder_hidden_states" and "added_cond_kwargs" ({"text_embeds": [B, P], "time_ids": [B, 6]}).
Condition = Union[torch.Tensor, dict[str, Any]]

MODES = ("auto", "reference", "fused")


LAYOUTS = ("auto", "one-call", "teacher-first")

# The first block's width from which mode="fused" runs all 3B rows in one call on the CPU (fused_layout):
# SD1.5 / SDXL widths (320) yes, the 64-wide small UNet (head size 8, CPU attention dominates) no.
FUSED_CPU_MIN_WIDTH = 320


def fused_layout(unet: torch.nn.Module, device: torch.device | str | None = None) -> tuple[str, str]:
    """How ``mode="fused"`` lays out the teacher rows for this UNet on this device, and why (one sentence).

    - ``"one-call"``: all 3B rows [trigger | stripped | teacher] in ONE UNet call: the fewest launching ops
      (``catfast bench train-step``'s ``launch_ops``). The row-aware convs, linears and attention spend no
      backward work on the teacher rows, but the ops between them (norms, activations, residual adds) run their
      backward over all rows (zero gradients in the teacher's) and save the teacher rows too (at most 1.5x the
      reference's saved bytes; measured 1.23x on ``sd15-narrow``).
    - ``"teacher-first"``: the B teacher rows first, as their own call under no_grad, then the 2B adapter
      rows as one call that still runs the shared prefix once and the two caption groups once until the
      first cross-attention. Gradients are compact by construction: no teacher row enters autograd (nothing
      saved for it, no zero padding, no backward over zero gradients).

    Measured on the 2-core dev CPU (``catfast bench train-step``; benchmarks/README.md): on the 64-wide small
    UNet teacher-first took 0.93-0.95x the reference step's CPU time (batch 2 / 1, 1 thread) where one-call
    took 0.98-1.00x; on ``sd15-narrow`` (320/640/1280) one-call took 0.89x and teacher-first 1.02x: at SD1.5
    widths one launch over 3B rows pays more than the copies cost (re-checked with the convolutions chosen per
    shape, quiet, 1 thread, interleaved: one-call 1424 ms, teacher-first 1511). So: one-call from
    ``FUSED_CPU_MIN_WIDTH`` channels on the CPU, teacher-first below. Off the CPU one-call (the layout the GPU
    kernels were built for, and the one that issues the fewest launching ops; neither layout has been timed on a
    GPU yet). Those figures predate the launch work (one-call then copied what autograd saved through hooks);
    after it, one loaded run (1 thread, process CPU time, benchmarks/results/train-step-cpu-dev-2core-launch.jsonl)
    had one-call ahead on both: sd15-narrow 2066 ms against teacher-first 2250 (reference 3129), small 852 against
    889 (reference 1049). The small UNet's rule stands until a quiet run says more."""
    model = _unwrap(unet)
    kind = torch.device(device).type if device is not None else model.conv_in.weight.device.type
    if kind != "cpu":
        return "one-call", f"on {kind} the 3B rows run as one call (neither layout has been timed there yet)"
    width = (getattr(getattr(model, "config", None), "block_out_channels", None) or (0,))[0]
    if width < FUSED_CPU_MIN_WIDTH:
        return "teacher-first", (
            f"on the CPU a {width}-channel UNet runs the teacher rows first (one call over 3B rows measured slower "
            f"below {FUSED_CPU_MIN_WIDTH} channels)"
        )
    return "one-call", f"on the CPU a {width}-channel UNet runs the 3B rows as one call (measured faster there)"


def auto_mode(
    unet: torch.nn.Module, device: torch.device | str | None = None, *, per_sample_adapters: bool = False
) -> tuple[str, str]:
    """The exact mode ``mode="auto"`` runs for this UNet on this device, and why (one sentence).

    The rule follows what ``catfast bench train-step`` measured on the quiet 2-core dev CPU
    (benchmarks/README.md, results/train-step-cpu-dev-2core-convs.jsonl), in the layout ``fused_layout``
    picks: at SD1.5 widths (one call) the fused step ran at 1.52-1.63x the reference's speed at 1 and 2
    threads (its frozen convolutions on the faster algorithm per shape, ``catfast.ops.conv``); on the small
    UNet (teacher rows first) at 1.00-1.18x at 1 thread but 0.89-0.97x at 2 threads, so below
    ``FUSED_CPU_MIN_WIDTH`` channels the reference runs when torch uses more than one thread. On a GPU the
    fused step has not been timed against the reference (one H200 lease timed it against the official step
    only, in the trainer's bf16 layout: 0.80x its speed at 0.52x its memory on SD1.5), so a single call chooses
    the reference there for a UNet and LoRA of one dtype; the trainer times both over a run's first steps
    instead (``catfast.train.mode_trial``). A UNet patched by ``patch_unet`` (the reference refuses it) and a
    half-precision UNet carrying fp32 LoRA weights run fused (peft's layers cast the input to the LoRA dtype
    and back, the fused op keeps the rank-r term in fp32 without copies); a UNet the fused step cannot run (a
    LoRA layer it cannot row-plan, several active adapters without per-sample adapters) runs the reference.
    ``per_sample_adapters``: the caller names each sample's adapter (``adapters=``)."""
    model = _unwrap(unet)
    if patch_report(model) is not None:
        return "fused", "the UNet is patched for row plans (patch_unet), which only the fused step runs"
    frozen = model.conv_in.weight.dtype
    lora = next((p.dtype for p in model.parameters() if p.requires_grad), frozen)
    if frozen != lora:
        return "fused", f"{frozen} UNet with {lora} LoRA weights: only the fused step mixes them"
    kind = torch.device(device).type if device is not None else model.conv_in.weight.device.type
    if kind != "cpu":
        return "reference", f"the fused step has not been measured faster than the reference on {kind}"
    blocker = _fused_blocker(model, per_sample_adapters)
    if blocker is not None:
        return "reference", f"the fused step cannot run this UNet: {blocker}"
    layout, _ = fused_layout(model, kind)
    width = (getattr(getattr(model, "config", None), "block_out_channels", None) or (0,))[0]
    threads = torch.get_num_threads()
    if layout == "teacher-first" and threads > 1:
        return "reference", (
            f"on the CPU at {threads} threads the reference is faster for a {width}-channel UNet "
            "(the fused step, teacher rows first, ran at 0.89-0.97x its speed at 2 threads)"
        )
    if layout == "teacher-first":
        return "fused", (
            f"on the CPU at 1 thread the fused step, teacher rows first, is faster for a {width}-channel UNet "
            "(1.00-1.18x the reference's speed)"
        )
    return "fused", (
        f"on the CPU the fused step is faster for a {width}-channel UNet (1.52-1.63x the reference's speed at 1 and "
        "2 threads, its small-map convolutions on GEMMs)"
    )


@dataclass
class CatLossOutput:
    """Scalar fp32 tensors. ``total`` carries the graph; ``ldm`` and ``cat`` are its two terms.

    When ``cat_weight == 0`` the CAT passes are skipped (plain LoRA cost) and ``cat`` is 0.
    """

    total: torch.Tensor
    ldm: torch.Tensor
    cat: torch.Tensor


def cat_loss(
    unet: torch.nn.Module,
    scheduler: Any,
    *,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Condition,
    cond_stripped: Condition,
    cat_weight: float = 1.0,
    mode: str = "auto",
    snr_gamma: float | None = None,
    adapters: Sequence[str] | None = None,
    layout: str = "auto",
) -> CatLossOutput:
    """CAT loss for one batch. Gradients land on the UNet's LoRA parameters.

    Args:
      unet: a diffusers UNet2DConditionModel with a peft LoRA adapter attached and active
        (``unet.add_adapter(LoraConfig(...))``).
      scheduler: a diffusers noise scheduler with ``add_noise``, ``get_velocity``, ``alphas_cumprod``
        and ``config.prediction_type`` in {"epsilon", "v_prediction"} (DDPMScheduler).
      latents: clean latents z0 ``[B, C, H, W]``; noise: eps, same shape; timesteps: ``[B]`` ints.
      cond / cond_stripped: text conditions for the caption with and without the trigger word.
      cat_weight: lambda; 0 gives the plain LoRA loss.
      mode: "auto" (the default) runs the faster exact mode for the UNet's device (``auto_mode``).
        "reference" runs the base pass (adapter disabled, no_grad) and then the two adapter
        passes as one batched call, as a careful diffusers user would. "fused" runs all 3B rows as
        ONE UNet call with a row plan ([trigger | stripped] on the active adapter with grad, then the
        teacher rows on the base without grad) through catfast's row-planned LoRA layers; the UNet is
        patched for the call (and left as the caller had it), or used as patched by ``patch_unet``.
      snr_gamma: min-SNR-gamma weighting of both terms, or None.
      adapters: the adapter of each sample (``[B]`` names; multi-concept training, one adapter per
        concept), or None for the UNet's one active adapter. The teacher is the base model either way.
      layout: mode "fused" only: "one-call" (all 3B rows in one UNet call), "teacher-first" (the teacher
        rows under no_grad, then the 2B adapter rows in one call: compact gradients) or "auto" (the faster
        for the UNet and device, ``fused_layout``). Same losses and gradients either way.

    ``unet`` may be wrapped in DistributedDataParallel: the wrapper runs the forward (so gradients are
    synchronised), the wrapped UNet is patched and checked.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cat_weight < 0:
        raise ValueError(f"cat_weight must be >= 0, got {cat_weight}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    model = _unwrap(unet)
    if mode == "auto":
        mode = auto_mode(model, per_sample_adapters=adapters is not None)[0]
    if layout == "auto":
        layout = fused_layout(model)[0]
    _check_batch(model, latents, noise, timesteps, cond, cond_stripped, adapters)

    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = _target(scheduler, latents, noise, timesteps).float()
    weights = _min_snr_weights(scheduler, timesteps, snr_gamma)
    if mode == "fused":
        pred, pred_stripped, base = _fused_predictions(
            unet, noisy, timesteps, cond, cond_stripped, adapters, cat_weight > 0, layout == "teacher-first"
        )
    else:
        pred, pred_stripped, base = _reference_predictions(
            unet, noisy, timesteps, cond, cond_stripped, adapters, cat_weight > 0
        )
    ldm = _weighted_mse(pred, target, weights)
    if pred_stripped is None:  # cat_weight == 0: the plain LoRA loss, without the CAT passes
        return CatLossOutput(total=ldm, ldm=ldm, cat=torch.zeros((), device=ldm.device))
    cat = _weighted_mse(pred_stripped, base, weights)
    return CatLossOutput(total=ldm + cat_weight * cat, ldm=ldm, cat=cat)


def _unwrap(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet inside a DistributedDataParallel wrapper (or the UNet itself)."""
    return unet.module if isinstance(unet, torch.nn.parallel.DistributedDataParallel) else unet


def _reference_predictions(unet, noisy, timesteps, cond, cond_stripped, adapters, with_teacher):
    """(pred on c, pred on c- or None, detached base on c- or None) as a careful diffusers user computes
    them: the teacher pass with the adapters disabled under no_grad, then the adapter passes batched
    (one batched call per adapter when samples use different adapters)."""
    model = _unwrap(unet)
    if patch_report(model) is not None:
        raise ValueError("mode='reference' needs the plain peft UNet; call unpatch_unet(unet) first")
    base = None
    if with_teacher:
        with torch.no_grad():
            model.disable_adapters()
            try:
                base = _predict(unet, noisy, timesteps, cond_stripped).float()
            finally:
                model.enable_adapters()
    if adapters is None:
        return (*_adapter_passes(unet, noisy, timesteps, cond, cond_stripped, with_teacher), base)
    active = model.active_adapters()
    pred = torch.empty_like(noisy)
    pred_stripped = torch.empty_like(noisy) if with_teacher else None
    try:
        for name in dict.fromkeys(adapters):
            model.set_adapter(name)
            idx = torch.tensor([i for i, a in enumerate(adapters) if a == name], device=noisy.device)
            p, p_stripped = _adapter_passes(
                unet, noisy[idx], timesteps[idx], _select(cond, idx), _select(cond_stripped, idx), with_teacher
            )
            pred = pred.index_copy(0, idx, p.to(pred.dtype))
            if with_teacher:
                pred_stripped = pred_stripped.index_copy(0, idx, p_stripped.to(pred.dtype))
    finally:
        model.set_adapter(active)
    return pred, pred_stripped, base


def _adapter_passes(unet, noisy, timesteps, cond, cond_stripped, with_stripped):
    """The adapter's predictions on c and (with_stripped) on c-, as one batched call."""
    if not with_stripped:
        return _predict(unet, noisy, timesteps, cond), None
    both = _predict(
        unet, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), _concat_conditions(cond, cond_stripped)
    )
    return both.chunk(2)


def _fused_predictions(unet, noisy, timesteps, cond, cond_stripped, adapters, with_teacher, teacher_first):
    """(pred on c, pred on c-, detached teacher on c-) from one UNet call over 3B rows, or with
    ``teacher_first`` from a no_grad call over the B teacher rows and then one over the 2B adapter rows
    (B rows and (pred, None, None) without the teacher)."""
    model = _unwrap(unet)
    # the active adapter is read once the UNet is patched: unpatched, diffusers walks the module tree for it
    with planned_unet(model, adapters or [], purpose="fused", error=ValueError) as call:
        if adapters is None:
            active = active_adapters(model)
            if len(active) != 1:
                raise ValueError(
                    "fused CAT trains one adapter unless adapters= names each sample's; "
                    f"the UNet has active adapters {active}"
                )
            adapters = active * noisy.shape[0]
        batch = noisy.shape[0]
        slots = call.slots(adapters)
        if with_teacher:  # [trigger | stripped] on the adapters with grad, then the teacher rows
            groups, rows_cond = 3, _concat_conditions(_concat_conditions(cond, cond_stripped), cond_stripped)
            slots, needs_grad = slots * 2 + [NO_ADAPTER] * batch, [True] * 2 * batch + [False] * batch
        else:
            groups, rows_cond, needs_grad = 1, cond, True
        if with_teacher and teacher_first:  # every row of the second call needs grad: nothing to keep or pad
            teacher = RowPlan.build([NO_ADAPTER] * batch, needs_grad=False, device=noisy.device)
            with torch.no_grad(), call.plan_rows(teacher):
                base = _predict(unet, noisy, timesteps, cond_stripped).float()
            plan = RowPlan.build(slots[: 2 * batch], device=noisy.device)
            with call.plan_rows(plan, identical_groups=2, twin_groups=True):
                out = _predict(unet, torch.cat([noisy] * 2), torch.cat([timesteps] * 2),
                               _concat_conditions(cond, cond_stripped))  # fmt: skip
            pred, pred_stripped = out.chunk(2)
            return pred, pred_stripped, base
        plan = RowPlan.build(slots, needs_grad=needs_grad, device=noisy.device)
        with call.plan_rows(plan, identical_groups=groups, twin_groups=with_teacher):
            out = _predict(unet, torch.cat([noisy] * groups), torch.cat([timesteps] * groups), rows_cond)
    if not with_teacher:
        return out, None, None
    pred, pred_stripped, base = out.chunk(3)
    return pred, pred_stripped, base.detach().float()


def compute_snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) per sample, fp32, ``[B]``."""
    abar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return abar / (1.0 - abar)


def _target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; catfast trains epsilon and v_prediction models")


def _min_snr_weights(scheduler: Any, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
    if snr_gamma is None:
        return None
    if snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0 or None, got {snr_gamma}")
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=float(snr_gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights).mean()


def _predict(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Condition) -> torch.Tensor:
    """The UNet's prediction, with inputs cast to its compute dtype (that of its frozen weights: the
    LoRA parameters may be fp32 on a bf16/fp16 UNet)."""
    dtype = _unwrap(unet).conv_in.weight.dtype
    if isinstance(cond, dict):
        added = {k: v.to(dtype) if k == "text_embeds" else v for k, v in (cond.get("added_cond_kwargs") or {}).items()}
        return unet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added or None,
        ).sample
    return unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype)).sample


def _concat_conditions(a: Condition, b: Condition) -> Condition:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    added = {k: torch.cat([v, b["added_cond_kwargs"][k]]) for k, v in (a.get("added_cond_kwargs") or {}).items()}
    return {
        "encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]]),
        "added_cond_kwargs": added or None,
    }


def _select(cond: Condition, idx: torch.Tensor) -> Condition:
    if isinstance(cond, torch.Tensor):
        return cond[idx]
    added = {k: v[idx] for k, v in (cond.get("added_cond_kwargs") or {}).items()}
    return {"encoder_hidden_states": cond["encoder_hidden_states"][idx], "added_cond_kwargs": added or None}


def _batch_of(cond: Condition) -> int:
    return (cond if isinstance(cond, torch.Tensor) else cond["encoder_hidden_states"]).shape[0]


def _check_batch(unet, latents, noise, timesteps, cond, cond_stripped, adapters) -> None:
    configs = getattr(unet, "peft_config", None)
    if not configs:
        raise ValueError("cat_loss needs a UNet with a LoRA adapter attached: unet.add_adapter(LoraConfig(...))")
    if adapters is not None:
        if len(adapters) != latents.shape[0]:
            raise ValueError(f"adapters names {len(adapters)} samples but the batch has {latents.shape[0]}")
        unknown = sorted(set(adapters) - set(configs))
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r} on the UNet (it has {list(configs)})")
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    if noise.shape != latents.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}")
    batch = latents.shape[0]
    if timesteps.shape != (batch,):
        raise ValueError(f"timesteps must be [B]=[{batch}], got shape {tuple(timesteps.shape)}")
    for name, c in (("cond", cond), ("cond_stripped", cond_stripped)):
        if _batch_of(c) != batch:
            raise ValueError(f"{name} has batch {_batch_of(c)}, latents have batch {batch}")
