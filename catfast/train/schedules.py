"""The trainer's schedules: the learning rate over the steps, and the distribution of the timesteps t
(uniform, or Diff-Tuning's chain of forgetting; docs/method.md, §2)."""

from __future__ import annotations

import math

import torch

from catfast.train.config import TrainConfig


def lr_lambda(config: TrainConfig):
    """lr factor after ``step`` optimizer steps: linear warmup reaching 1 at ``warmup_steps``, then
    constant, cosine to 0 or linear to 0 at ``steps``."""
    warmup, steps, kind = config.warmup_steps, config.steps, config.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def timestep_probs(config: TrainConfig, scheduler) -> torch.Tensor | None:
    """None for uniform timesteps; for Diff-Tuning's chain of forgetting (docs/method.md, §2), the
    categorical P(t) proportional to (t + 1) ** timestep_power over the scheduler's T training steps:
    noisy timesteps, where the base model's knowledge transfers least, are trained most. Both CAT terms
    share each sample's t, as the CAT loss requires."""
    T = scheduler.config.num_train_timesteps
    if config.timesteps == "uniform":
        return None
    probs = torch.arange(1, T + 1, dtype=torch.float64) ** config.timestep_power
    return (probs / probs.sum()).float()


def sample_timesteps(probs: torch.Tensor | None, n: int, gen: torch.Generator, num: int) -> torch.Tensor:
    if probs is None:
        return torch.randint(0, num, (n,), generator=gen)
    return torch.multinomial(probs, n, replacement=True, generator=gen)
