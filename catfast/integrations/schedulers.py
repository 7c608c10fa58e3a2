"""diffusers noise schedulers, the one place outside the model loaders that builds them: the training
scheduler of catfast's random-weight models and demo, and sampling schedulers by class name from a base
model's scheduler config (the batched sampler, the serving engine's per-request schedulers, benchmarks)."""

from __future__ import annotations

from typing import Any


def training_scheduler(**overrides: Any):
    """A ``DDPMScheduler`` with SD1.5's training config (``factory.SCHEDULER_CONFIG``), fields overridden by
    ``overrides`` (e.g. ``prediction_type="v_prediction"``)."""
    from diffusers import DDPMScheduler  # lazy: diffusers

    from catfast.integrations.factory import SCHEDULER_CONFIG

    return DDPMScheduler(**{**SCHEDULER_CONFIG, **overrides})


def sampling_scheduler(class_name: str, config: Any):
    """A fresh diffusers scheduler of class ``class_name`` (``"DDIMScheduler"``, ``"EulerDiscreteScheduler"``,
    ...) built ``from_config(config)``: each sampler run or request owns one (they keep per-run state)."""
    import diffusers  # lazy: diffusers

    return getattr(diffusers, class_name).from_config(config)
