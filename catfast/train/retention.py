"""Retention rows beside the CAT loss, all in the one row-planned UNet call (docs/retention.md).

With none of the options below the trainer runs `catfast.train.objective.cat_loss` unchanged (the CAT
paper's step). With any of them it runs `Retention.loss`, whose rows for B concept samples are:

  grad rows (the trained adapter of each sample):
    concept   z_t, c          B      target: eps (or v)                      -> ldm
    stripped  z_t, c-         B      target: teacher on c-                   -> cat   (cat_weight > 0)
    extra     z_t, p_i        B      target: teacher on p_i                  -> cat   (--cat-prompts)
    kept      z_t, q_i        B      target: teacher on q_i                  -> keep  (--keep)
    bank      zb_t, c_bank    Nb     target: the bank row's true eps (or v)  -> bank  (--bank)
  teacher rows (no adapter, no grad): stripped, extra, kept (B each)

- ``--cat-prompts``: p_i is drawn per sample and step from the extra preservation prompts ("stripped+empty":
  the empty prompt that classifier-free guidance subtracts; a FILE: its lines). The CAT term is then the
  mean over the stripped and the extra rows: cat = (mse(stripped) + mse(extra)) / 2.
- ``--keep``: the kept adapters are merged into the frozen weights (`catfast.train.lifelong`), so the
  teacher is base + kept adapters; q_i is drawn per sample and step from their recorded trigger prompts.
- ``--bank``: Nb = max(1, round(B * ratio / (1 - ratio))) rows per step (B of (B + Nb) rows carry concept
  data: Diff-Tuning's LWF_ratio), each a bank latent drawn uniformly with fresh noise and a timestep from
  the retention weighting xi(t) proportional to (T - t) ** timestep_power, conditioned on its recorded
  prompt. The concept rows keep the trainer's timesteps (``--timesteps chain-of-forgetting`` is
  Diff-Tuning's psi(t)).

total = ldm + cat_weight * cat + keep_weight * keep + bank_weight * bank; each term is a mean over its rows
(min-SNR weights per row with ``snr_gamma``). Extra and kept rows reuse the concept sample's z_t and t:
the terms hold the adapter's output to the teacher's at the inputs training visits.

``mode="fused"`` computes every row in one UNet call with a row plan (the grad rows first, one run);
``mode="reference"`` computes the same rows as a careful peft user would: teacher rows with the adapters
disabled under no_grad, then one batched call per adapter. Both give the same loss and gradients (tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from catfast.errors import CatfastError

CAT_PROMPTS = ("stripped", "stripped+empty")  # or a file of prompts


@dataclass
class RetentionLoss:
    """Scalar fp32 tensors: ``total`` carries the graph; the terms are unweighted means (0 when off)."""

    total: torch.Tensor
    ldm: torch.Tensor
    cat: torch.Tensor
    keep: torch.Tensor
    bank: torch.Tensor


@dataclass
class _Rows:
    """The inputs of one retention call: per row the noisy latent, timestep, condition, adapter (None: the
    teacher) and whether it needs gradients; ``groups`` names each row's group."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    cond: object
    adapters: list
    needs_grad: list
    groups: dict  # name -> slice of rows


def extra_prompts(spec: str) -> list[str]:
    """The extra preservation prompts of ``--cat-prompts spec``: [] (stripped), [""] (stripped+empty), or a
    file's non-empty lines (CatfastError naming the file when missing, unreadable or empty)."""
    from catfast.train.bank import read_prompts

    if spec == "stripped":
        return []
    if spec == "stripped+empty":
        return [""]
    if not Path(spec).exists():
        raise CatfastError(f"--cat-prompts must be stripped, stripped+empty or a prompt file; {spec}: no such file")
    return read_prompts(spec, "--cat-prompts file")


class Retention:
    """What a retention run adds to each step (module docstring). Build it with `prepare` after the base
    is loaded and before the trainer attaches its adapters."""

    def __init__(
        self,
        *,
        extra_cond=None,
        keep_cond=None,
        bank_latents: torch.Tensor | None = None,
        bank_cond=None,
        bank_ratio: float = 0.2,
        bank_probs: torch.Tensor | None = None,
        cat_weight: float = 1.0,
        keep_weight: float = 1.0,
        bank_weight: float = 0.1,
        snr_gamma: float | None = None,
    ):
        self.extra_cond, self.keep_cond = extra_cond, keep_cond
        self.bank_latents, self.bank_cond, self.bank_probs = bank_latents, bank_cond, bank_probs
        self.bank_ratio, self.cat_weight, self.keep_weight, self.bank_weight = (
            bank_ratio,
            cat_weight,
            keep_weight,
            bank_weight,
        )
        self.snr_gamma = snr_gamma

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def prepare(cls, config, base, device, dtype) -> Retention | None:
        """None when ``config`` asks for no retention (the trainer then runs `cat_loss`). Otherwise reads and
        checks every input first (prompt file, bank, kept adapters: CatfastError naming the file), then
        merges the kept adapters into ``base.unet`` (which must not carry adapters yet) and encodes the
        prompts. Conditions are kept on ``device`` in ``dtype``."""
        extras = extra_prompts(config.cat_prompts)
        if not extras and config.bank is None and not config.keep:
            return None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CatfastError("--cat-prompts, --bank and --keep run in one process for now, not under torchrun")
        from catfast.integrations.models import encode_prompt
        from catfast.train.bank import load_bank
        from catfast.train.lifelong import merge_kept, read_kept

        side = base.unet.config.sample_size * base.vae_scale_factor
        bank = None
        if config.bank is not None:
            if config.buckets or (config.resolution is not None and config.resolution != side):
                raise CatfastError(
                    f"--bank rows share the UNet call with the concept rows: train at the bank's size ({side} px), "
                    "without --buckets or another --resolution"
                )
            bank = load_bank(config.bank, base)  # before the kept adapters change the UNet
        kept = read_kept(config.keep, base.unet) if config.keep else []
        merge_kept(base.unet, kept)
        size = (side, side) if base.is_sdxl else None

        def encode(prompts):
            return _to(encode_prompt(base, prompts, image_size=size), device, dtype)

        bank_probs = None
        if bank is not None:
            T = base.scheduler.config.num_train_timesteps
            probs = torch.arange(T, 0, -1, dtype=torch.float64) ** config.timestep_power  # xi(t) ~ (T - t)^s
            bank_probs = (probs / probs.sum()).float()
        return cls(
            extra_cond=encode(extras) if extras else None,
            keep_cond=encode([p for k in kept for p in k.prompts]) if kept else None,
            bank_latents=bank.latents.to(device) if bank is not None else None,
            bank_cond=encode(bank.prompts) if bank is not None else None,
            bank_ratio=config.bank_ratio,
            bank_probs=bank_probs,
            cat_weight=config.cat_weight,
            keep_weight=config.keep_weight,
            bank_weight=config.bank_weight,
            snr_gamma=config.snr_gamma,
        )

    def bank_rows(self, batch: int) -> int:
        """Bank rows per step for ``batch`` concept rows (0 without a bank)."""
        if self.bank_latents is None:
            return 0
        return max(1, round(batch * self.bank_ratio / (1 - self.bank_ratio)))

    # ------------------------------------------------------------------------------------------ one step

    def loss(
        self,
        unet,
        scheduler,
        *,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        cond,
        cond_stripped,
        adapters: Sequence[str],
        generator: torch.Generator,
        mode: str = "fused",
    ) -> RetentionLoss:
        """The step's loss (module docstring). ``generator`` (CPU) draws the extra and kept prompts, the bank
        rows, their noise and timesteps, after the caller drew the concept rows' noise and timesteps."""
        from catfast.train.objective import _min_snr_weights, _target, _weighted_mse

        if mode not in ("fused", "reference"):
            raise ValueError(f"mode must be 'fused' or 'reference', got {mode!r}")
        batch, device = latents.shape[0], latents.device
        adapters = list(adapters)
        if len(adapters) != batch:
            raise ValueError(f"adapters names {len(adapters)} samples but the batch has {batch}")
        noisy = scheduler.add_noise(latents, noise, timesteps)
        parts = []  # (name, noisy, t, cond, adapters, needs_grad)
        parts.append(("concept", noisy, timesteps, cond, adapters, True))
        teacher = []
        if self.cat_weight > 0:
            parts.append(("stripped", noisy, timesteps, cond_stripped, adapters, True))
            teacher.append(("t_stripped", noisy, timesteps, cond_stripped, [None] * batch, False))
        if self.extra_cond is not None:
            pick = torch.randint(0, _batch_of(self.extra_cond), (batch,), generator=generator)
            extra = _take(self.extra_cond, pick.to(device))
            parts.append(("extra", noisy, timesteps, extra, adapters, True))
            teacher.append(("t_extra", noisy, timesteps, extra, [None] * batch, False))
        if self.keep_cond is not None:
            pick = torch.randint(0, _batch_of(self.keep_cond), (batch,), generator=generator)
            kept = _take(self.keep_cond, pick.to(device))
            parts.append(("keep", noisy, timesteps, kept, adapters, True))
            teacher.append(("t_keep", noisy, timesteps, kept, [None] * batch, False))
        nb = self.bank_rows(batch)
        if nb:
            if self.bank_latents.shape[1:] != latents.shape[1:]:
                raise ValueError(
                    f"bank latents {tuple(self.bank_latents.shape[1:])} != concept latents {tuple(latents.shape[1:])}"
                )
            pick = torch.randint(0, self.bank_latents.shape[0], (nb,), generator=generator)
            bank_noise = torch.randn((nb, *latents.shape[1:]), generator=generator).to(device, latents.dtype)
            num = self.bank_probs.numel()
            bank_t = torch.multinomial(self.bank_probs, nb, replacement=True, generator=generator).clamp_(0, num - 1)
            bank_t = bank_t.to(device)
            bank_z0 = self.bank_latents[pick.to(device)].to(latents.dtype)
            bank_noisy = scheduler.add_noise(bank_z0, bank_noise, bank_t)
            bank_adapters = [adapters[j % batch] for j in range(nb)]
            parts.append(("bank", bank_noisy, bank_t, _take(self.bank_cond, pick.to(device)), bank_adapters, True))
        rows = _assemble(parts + teacher)
        out = _run_fused(unet, rows) if mode == "fused" else _run_reference(unet, rows)
        g = {name: out[s] for name, s in rows.groups.items()}

        def weights(t):
            return _min_snr_weights(scheduler, t, self.snr_gamma)

        zero = torch.zeros((), device=device)
        w = weights(timesteps)
        target = _target(scheduler, latents, noise, timesteps).float()
        ldm = _weighted_mse(g["concept"], target, w)
        total = ldm
        cat = keep = bank = zero
        if self.cat_weight > 0:
            terms = [_weighted_mse(g["stripped"], g["t_stripped"].detach().float(), w)]
            if "extra" in g:
                terms.append(_weighted_mse(g["extra"], g["t_extra"].detach().float(), w))
            cat = sum(terms) / len(terms)
            total = total + self.cat_weight * cat
        if "keep" in g:
            keep = _weighted_mse(g["keep"], g["t_keep"].detach().float(), w)
            total = total + self.keep_weight * keep
        if nb:
            bank_target = _target(scheduler, bank_z0, bank_noise, bank_t).float()
            bank = _weighted_mse(g["bank"], bank_target, weights(bank_t))
            total = total + self.bank_weight * bank
        return RetentionLoss(total=total, ldm=ldm, cat=cat, keep=keep, bank=bank)


# ------------------------------------------------------------------------------------------- row calls


def _assemble(parts) -> _Rows:
    noisy, ts, conds, adapters, grads, groups, start = [], [], [], [], [], {}, 0
    for name, z, t, c, a, g in parts:
        n = z.shape[0]
        noisy.append(z)
        ts.append(t)
        conds.append(c)
        adapters += list(a)
        grads += [g] * n
        groups[name] = slice(start, start + n)
        start += n
    return _Rows(torch.cat(noisy), torch.cat(ts), _cat_conds(conds), adapters, grads, groups)


def _run_fused(unet, rows: _Rows) -> torch.Tensor:
    """Every row in one UNet call with a row plan: each row on its adapter (None: no adapter); the row-aware
    layers spend backward work on the grad rows only."""
    from catfast.integrations.row_call import planned_unet
    from catfast.rows import RowPlan
    from catfast.train.objective import _predict, _unwrap

    model = _unwrap(unet)
    with planned_unet(model, rows.adapters, purpose="fused", error=ValueError) as call:
        plan = RowPlan.build(call.slots(rows.adapters), needs_grad=rows.needs_grad, device=rows.noisy.device)
        with call.plan_rows(plan):
            return _predict(unet, rows.noisy, rows.timesteps, rows.cond)


def _run_reference(unet, rows: _Rows) -> torch.Tensor:
    """The same rows through plain peft: the teacher rows with the adapters disabled under no_grad, then
    one batched call per adapter (as `cat_loss(mode="reference")` does)."""
    from catfast.integrations.patch import patch_report
    from catfast.train.objective import _predict, _unwrap

    model = _unwrap(unet)
    if patch_report(model) is not None:
        raise ValueError("mode='reference' needs the plain peft UNet; call unpatch_unet(unet) first")
    out = [None] * len(rows.adapters)
    teacher = [i for i, a in enumerate(rows.adapters) if a is None]
    if teacher:
        idx = torch.tensor(teacher, device=rows.noisy.device)
        with torch.no_grad():
            model.disable_adapters()
            try:
                pred = _predict(unet, rows.noisy[idx], rows.timesteps[idx], _take(rows.cond, idx))
            finally:
                model.enable_adapters()
        for k, i in enumerate(teacher):
            out[i] = pred[k]
    active = model.active_adapters()
    try:
        for name in dict.fromkeys(a for a in rows.adapters if a is not None):
            model.set_adapter(name)
            mine = [i for i, a in enumerate(rows.adapters) if a == name]
            idx = torch.tensor(mine, device=rows.noisy.device)
            pred = _predict(unet, rows.noisy[idx], rows.timesteps[idx], _take(rows.cond, idx))
            for k, i in enumerate(mine):
                out[i] = pred[k]
    finally:
        model.set_adapter(active)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ conditions


def _batch_of(cond) -> int:
    return (cond if isinstance(cond, torch.Tensor) else cond["encoder_hidden_states"]).shape[0]


def _take(cond, idx: torch.Tensor):
    """Rows ``idx`` of a condition (a tensor, or SDXL's dict of tensors)."""
    if isinstance(cond, torch.Tensor):
        return cond[idx]
    added = {k: v[idx] for k, v in (cond.get("added_cond_kwargs") or {}).items()}
    return {"encoder_hidden_states": cond["encoder_hidden_states"][idx], "added_cond_kwargs": added or None}


def _cat_conds(conds: list):
    if isinstance(conds[0], torch.Tensor):
        return torch.cat(conds)
    keys = list(conds[0].get("added_cond_kwargs") or {})
    added = {k: torch.cat([c["added_cond_kwargs"][k] for c in conds]) for k in keys}
    return {
        "encoder_hidden_states": torch.cat([c["encoder_hidden_states"] for c in conds]),
        "added_cond_kwargs": added or None,
    }


def _to(cond, device, dtype):
    if isinstance(cond, torch.Tensor):
        return cond.to(device, dtype)
    return {k: _to(v, device, dtype) for k, v in cond.items()} if isinstance(cond, dict) else cond
