"""diffusers noise schedulers, the one place outside the model loaders that builds them: the training
scheduler of catfast's random-weight models and demo, and sampling schedulers by class name from a base
model's scheduler config (the batched sampler, the serving engine's per-request schedulers, benchmarks), and the
flow-matching Euler scheduler of the transformers' samplers (``flow_sampling_scheduler``)."""

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


def flow_sampling_scheduler(
    config: Any, steps: int, image_seq_len: int, *, flow_sigmas: bool, max_shift: float, device=None
):
    """A fresh ``FlowMatchEulerDiscreteScheduler`` from a transformer pipeline's scheduler ``config`` with its
    ``steps`` timesteps set as the pipelines set them: ``flow_sigmas`` (Flux, Qwen-Image) passes the sigmas
    ``linspace(1, 1/steps, steps)`` unless the config makes its own, and a resolution ``mu`` (the pipelines'
    ``calculate_shift`` over ``image_seq_len`` tokens, ``max_shift`` where the config has none) is given
    whenever ``flow_sigmas`` or the config's dynamic shifting asks for one; else the scheduler's own grid."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler  # lazy: diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    config = scheduler.config
    kwargs = {}
    if flow_sigmas or config.get("use_dynamic_shifting", None):
        kwargs["mu"] = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift),
        )
    if flow_sigmas and not config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)
    scheduler.set_begin_index(0)
    return scheduler
