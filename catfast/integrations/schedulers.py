"""diffusers noise schedulers, the one place outside the model loaders that builds them: the training
scheduler of catfast's random-weight models and demo, and sampling schedulers by class name from a base
model's scheduler config (the batched sampler, the serving engine's per-request schedulers, benchmarks)."""

from __future__ import annotations

from typing import Any

# SD1.5's training noise schedule (diffusers' DDPMScheduler config of runwayml/stable-diffusion-v1-5)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def training_scheduler(**overrides: Any):
    """A ``DDPMScheduler`` with SD1.5's training config (``SCHEDULER_CONFIG``), fields overridden by
    ``overrides`` (e.g. ``prediction_type="v_prediction"``)."""
    from diffusers import DDPMScheduler  # lazy: diffusers

    return DDPMScheduler(**{**SCHEDULER_CONFIG, **overrides})


def sampling_scheduler(class_name: str, config: Any):
    """A fresh diffusers scheduler of class ``class_name`` (``"DDIMScheduler"``, ``"EulerDiscreteScheduler"``,
    ...) built ``from_config(config)``: each sampler run or request owns one (they keep per-run state)."""
    import diffusers  # lazy: diffusers

    return getattr(diffusers, class_name).from_config(config)
