"""Today's CAT / output-preservation training steps, re-implemented for `catfast bench train-step --against`.

Each contestant computes one step's loss the way the public code does, on the same diffusers UNet with the
same peft LoRA adapter that catfast trains (the public code's own LoRA wrappers differ in plumbing, not in
arithmetic: ``y = W x + scale * B A x``). Only the UNet calls, their grad modes, their batching and the loss
arithmetic are reproduced; data loading, logging and optimizers are left out. Written from reading the
public code (the facts carry over, the code does not):

- ``official``: OnomaAi101/CAT ``cat_train.py`` (training loop in ``main``), with
  ``utils/train_utils.py::cat_import_model`` and ``utils/train_loops.py::snr_loss``. The LoRA UNet is called
  on the trigger caption, then on the stripped caption (``model_pred_no_trigger``), then a second UNet,
  loaded again from the checkpoint in fp32 with ``requires_grad_(False)`` but not under ``no_grad``, on the
  stripped caption (``base_pred``); ``loss = snr_loss(pred, target) + cat_factor * snr_loss(pred_no_trigger,
  base_pred)``; one backward. (The loop also gathers the loss across processes; one process here.)
- ``ai-toolkit``: ostris/ai-toolkit ``extensions_built_in/sd_trainer/SDTrainer.py``, differential output
  preservation (``diff_output_preservation``): ``get_prior_prediction`` runs the UNet under ``no_grad`` with
  the network inactive on the class prompt, ``train_single_accumulation`` then runs the trigger pass with
  grad, computes its loss (``calculate_loss``: plain MSE without min-SNR), runs the preservation pass on the
  class prompt with grad and adds ``mse(preservation_pred, prior_pred) * diff_output_preservation_multiplier``;
  one backward. Here the class prompt is the stripped caption, so the loss is catfast's CAT loss.
- ``kohya``: kohya-ss/sd-scripts ``train_network.py``, ``NetworkTrainer.get_noise_pred_and_target``: the
  preservation samples are rows of the batch (``custom_attributes["diff_output_preservation"]``); one
  adapter forward over all rows with grad, then ``network.set_multiplier(0.0)`` and a ``no_grad`` forward
  over the preservation rows only (as ``flux_train_network.py`` does; the SD ``call_unet`` ignores
  ``indices`` and would run every row), whose output replaces those rows' targets; the loss is the mean of
  the per-sample MSEs (``process_batch``). With multiplier 0 the LoRA branch is still computed (``networks/
  lora.py::LoRAModule.forward`` multiplies its output by 0). Here the batch is [trigger rows | stripped
  rows], so the loss is (L_LDM + L_CAT) / 2: catfast's CAT loss (cat_weight 1, no min-SNR) halved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from catfast.errors import CatfastError
from catfast.integrations.peft_adapters import peft_lora_layers
from catfast.train.objective import CatLossOutput, compute_snr
from catfast.train.objective import _predict as predict_cast

CONTESTANTS = ("official", "ai-toolkit", "kohya")

# How each contestant's loss relates to cat_loss(..., cat_weight=1, snr_gamma=None): the factor that
# makes it equal (loss and LoRA gradients), for the parity check.
LOSS_FACTOR = {"official": 1.0, "ai-toolkit": 1.0, "kohya": 2.0}


@dataclass
class Contestant:
    """One contestant bound to its UNet(s). ``loss(**batch)`` runs the forward passes of one step and
    returns the loss (``total`` carries the graph); ``modules`` are every model it holds (the official
    code's second UNet counts in its parameter memory)."""

    name: str
    loss: Callable[..., CatLossOutput]
    modules: tuple[torch.nn.Module, ...]


def check_names(names) -> list[str]:
    """The contestant names, validated (an unknown one raises a one-line error listing the valid ones)."""

    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown:
        raise CatfastError(f"unknown contestant {unknown[0]!r}; choose from {', '.join(CONTESTANTS)}")
    return list(dict.fromkeys(names))


def make_contestant(name: str, unet, scheduler, load_teacher: Callable[[], torch.nn.Module]) -> Contestant:
    """Bind contestant ``name`` to ``unet`` (with a peft LoRA adapter attached and active).

    ``load_teacher()`` loads the base UNet again, as a separate copy; only ``official`` calls it (the public
    code loads the checkpoint a second time, in fp32)."""
    check_names([name])
    if name == "official":
        teacher = load_teacher().to(device=unet.device, dtype=torch.float32).requires_grad_(False)
        return Contestant(name, lambda **b: official_loss(unet, teacher, scheduler, **b), (unet, teacher))
    if name == "ai-toolkit":
        return Contestant(name, lambda **b: ai_toolkit_loss(unet, scheduler, **b), (unet,))
    return Contestant(name, lambda **b: kohya_loss(unet, scheduler, **b), (unet,))


def _target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _snr_loss(snr_gamma, pred, target, scheduler, timesteps):
    """OnomaAi101/CAT utils/train_loops.py::snr_loss (for v-prediction it clips SNR + 1, not SNR)."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        snr = snr + 1
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.dim()))) * weights).mean()


def _call(unet, noisy, timesteps, cond):
    """The UNet's prediction with inputs cast to its weights' dtype (SDXL conditions are dicts)."""
    return predict_cast(unet, noisy, timesteps, cond)


def official_loss(
    unet, teacher, scheduler, *, latents, noise, timesteps, cond, cond_stripped, cat_factor=1.0, snr_gamma=None
) -> CatLossOutput:
    """OnomaAi101/CAT cat_train.py: three sequential UNet calls, the third on a second fp32 UNet copy
    (requires_grad off, not under no_grad), SNR-weighted MSE."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = _target(scheduler, latents, noise, timesteps)
    model_pred = _call(unet, noisy, timesteps, cond)
    model_pred_no_trigger = _call(unet, noisy, timesteps, cond_stripped)
    base_pred = _call(teacher, noisy, timesteps, cond_stripped)
    model_loss = _snr_loss(snr_gamma, model_pred, target, scheduler, timesteps)
    cat = _snr_loss(snr_gamma, model_pred_no_trigger, base_pred, scheduler, timesteps)
    return CatLossOutput(total=model_loss + cat_factor * cat, ldm=model_loss, cat=cat)


def ai_toolkit_loss(
    unet, scheduler, *, latents, noise, timesteps, cond, cond_stripped, multiplier=1.0
) -> CatLossOutput:
    """ai-toolkit SDTrainer differential output preservation: no_grad prior pass with the network
    inactive, trigger pass with grad, class-prompt pass with grad (class prompt = stripped caption)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = _target(scheduler, latents, noise, timesteps)
    with torch.no_grad():
        unet.disable_adapters()
        try:
            prior_pred = _call(unet, noisy, timesteps, cond_stripped).detach()
        finally:
            unet.enable_adapters()
    noise_pred = _call(unet, noisy, timesteps, cond)
    loss = F.mse_loss(noise_pred.float(), target.float(), reduction="none").mean()
    preservation_pred = _call(unet, noisy, timesteps, cond_stripped)
    preservation = F.mse_loss(preservation_pred.float(), prior_pred.float())
    return CatLossOutput(total=loss + preservation * multiplier, ldm=loss, cat=preservation)


def kohya_loss(unet, scheduler, *, latents, noise, timesteps, cond, cond_stripped) -> CatLossOutput:
    """kohya sd-scripts DOP: the batch is [trigger rows | preservation rows]; one adapter forward over all
    rows, then multiplier 0 and a no_grad forward over the preservation rows, whose output is their target.
    ``ldm`` / ``cat`` are the two halves' mean MSEs; ``total`` is their mean (kohya's loss)."""
    batch = latents.shape[0]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    rows_noisy, rows_t = torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps])
    noise_pred = _call(unet, rows_noisy, rows_t, torch.cat([cond, cond_stripped]))
    target = torch.cat([_target(scheduler, latents, noise, timesteps)] * 2).clone()
    idx = list(range(batch, 2 * batch))  # the diff_output_preservation rows
    with _multiplier_zero(unet), torch.no_grad():
        prior = _call(unet, rows_noisy[idx], rows_t[idx], cond_stripped)
    target[idx] = prior.to(target.dtype)
    per_sample = F.mse_loss(noise_pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return CatLossOutput(total=per_sample.mean(), ldm=per_sample[:batch].mean(), cat=per_sample[batch:].mean())


class _multiplier_zero:
    """kohya's ``network.set_multiplier(0.0)`` on peft LoRA layers: every active adapter's scaling set to 0
    (the LoRA branch still runs and is multiplied by 0), restored on exit."""

    def __init__(self, unet):
        self.layers = peft_lora_layers(unet)

    def __enter__(self):
        self.saved = [dict(m.scaling) for m in self.layers]
        for m in self.layers:
            for k in m.scaling:
                m.scaling[k] = 0.0

    def __exit__(self, *exc):
        for m, s in zip(self.layers, self.saved):
            m.scaling.update(s)
