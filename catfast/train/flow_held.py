"""Held prompts of a DiT training run: `--cat-prompts`, `--keep` and `--bank` on the flow-matching path
(docs/retention.md).

A held prompt is one the adapter must leave as the teacher (the frozen transformer) has it. Per sample and
step, one prompt of each kind is drawn with the run's generator and becomes one more student row and one more
teacher row in the same row-planned call (``flow_cat_loss(preserve=...)``), with the concept sample's x_t and
sigma, as the UNet's `train/retention.py` does:

- ``--cat-prompts stripped+empty | FILE``: extra CAT prompts; the CAT term becomes the mean over the stripped
  and the extra rows, ``cat = (mse(stripped) + mse(extra)) / 2``, weighted by ``cat_weight``;
- ``--keep A[,B...]``: adapters trained before (their ``catfast.trigger_prompts`` metadata) are merged into the
  frozen weights, so the teacher is base + kept; one of their recorded prompts per sample gives the ``keep``
  term, weighted by ``keep_weight``;
- ``--bank DIR``: a knowledge bank of the base's samples (``flow_bank``): Nb rows a step on the adapter with the
  true velocity as target (no teacher row), weighted by ``bank_weight``;
- ``--caption-dropout P``: each sample's diffusion term sees the empty caption with probability P (its CAT
  term keeps the stripped caption), drawn before the sample's noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catfast.train.config import TrainConfig
from catfast.train.flow_bank import BankReplay, check_shape, load_flow_bank
from catfast.train.lifelong import KeptAdapter, merge_kept, read_kept
from catfast.train.retention import extra_prompts

COMPONENT = "transformer"


@dataclass
class HeldPrompts:
    """The run's extra CAT prompts and kept adapters (empty lists: a plain CAT run), their weights."""

    extra: list[str] = field(default_factory=list)
    kept: list[KeptAdapter] = field(default_factory=list)
    cat_weight: float = 1.0
    keep_weight: float = 1.0
    bank: BankReplay | None = None
    caption_dropout: float = 0.0  # share of samples whose diffusion term sees the empty caption

    @classmethod
    def read(cls, config: TrainConfig) -> HeldPrompts:
        """Read ``--cat-prompts``, the ``--keep`` files and the ``--bank`` folder (CatfastError naming a missing or
        unreadable file, a kept adapter without recorded prompts or of another denoiser, a bank of another
        base); whether a kept adapter's layers fit the transformer is checked when it is merged, before any
        weight changes, and the bank's latent shape once the training latents are planned (``check_bank``)."""
        kept = read_kept(config.keep, None, COMPONENT) if config.keep else []
        held = cls(extra_prompts(config.cat_prompts), kept, config.cat_weight, config.keep_weight,
                   caption_dropout=config.caption_dropout)  # fmt: skip
        if config.bank is not None:
            bank = load_flow_bank(config.bank, config.base)
            offset = len(held.extra) + len(held.kept_prompts)  # the bank prompts come after the held ones
            held.bank = BankReplay(bank, config.bank_ratio, config.bank_weight, offset)
        return held

    def check_bank(self, latent_shape: tuple[int, ...]) -> None:
        """BankError unless the bank's latents have the training latents' ``(C, h, w)`` (no bank: nothing)."""
        if self.bank is not None:
            check_shape(self.bank.bank, latent_shape)

    @property
    def kept_prompts(self) -> list[str]:
        return [p for k in self.kept for p in k.prompts]

    @property
    def prompts(self) -> list[str]:
        """Every prompt to encode, extra ones first, then the kept adapters', then the bank's (one per bank row):
        what ``build_flow_cache(prompts=)`` encodes, in this order."""
        bank = self.bank.bank.prompts if self.bank is not None else []
        return self.extra + self.kept_prompts + bank + ([""] if self.caption_dropout > 0 else [])

    def dropped(self, n: int, rows: slice, generator: torch.Generator) -> dict[int, int] | None:
        """Caption dropout for this rank's ``rows`` of a global batch of ``n`` samples (drawn for the whole global
        batch on every rank): {row of this rank: the empty caption's index in ``prompts``}; None when off."""
        if self.caption_dropout <= 0:
            return None
        drop = (torch.rand(n, generator=generator) < self.caption_dropout)[rows].tolist()
        return {i: len(self.prompts) - 1 for i, d in enumerate(drop) if d}

    @property
    def stripped_weight(self) -> float:
        """The stripped rows' CAT weight: half of ``cat_weight`` when extra prompts share the CAT mean."""
        return self.cat_weight / 2 if self.extra else self.cat_weight

    def merge_kept(self, model: torch.nn.Module) -> None:
        """Merge the kept adapters into the transformer's frozen weights (AdapterShapeError, naming the file and
        layer, before any weight changes when one does not fit)."""
        merge_kept(model, self.kept, COMPONENT)

    def groups(self, dataset, n: int, rows: slice, generator: torch.Generator, device, dtype) -> list:
        """``flow_cat_loss``'s ``preserve`` for this rank's ``rows`` of a global batch of ``n`` samples: the
        prompts are drawn for the whole global batch on every rank (as the noise is), then sliced."""
        out = []
        offset = 0
        for prompts, weight in ((self.extra, self.stripped_weight), (self.kept_prompts, self.keep_weight)):
            if prompts:
                drawn = torch.randint(len(prompts), (n,), generator=generator)[rows] + offset
                out.append((dataset.prompt_batch(drawn.tolist(), device, dtype), weight))
            offset += len(prompts)
        return out

    def bank_rows(self, family, dataset, batch: int, generator: torch.Generator, device, dtype):
        """``flow_cat_loss``'s ``bank`` for a step of ``batch`` concept rows (None without a bank)."""
        if self.bank is None:
            return None
        return self.bank.rows(family, dataset, batch, generator, device, dtype)

    def terms(self, out) -> list[torch.Tensor]:
        """(cat, keep, bank) of one ``flow_cat_loss`` output, detached: cat over the stripped and extra rows,
        keep over the kept rows, bank over the bank rows (0 where off)."""
        zero = torch.zeros_like(out.ldm)
        cat = out.cat if out.cat is not None else zero
        preserved = list(out.preserved)
        if self.extra:
            cat = (cat + preserved.pop(0)) / 2
        keep = preserved.pop(0) if self.kept else zero
        return [cat, keep, out.bank if out.bank is not None else zero]
