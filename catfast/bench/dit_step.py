"""`catfast bench dit-step`: the flow-matching CAT step on a diffusion transformer, fused against reference.

Both modes of ``catfast.train.flow_objective.flow_cat_loss`` (forward + backward of one step) on the same
transformer with a random LoRA (A and B drawn, alpha = rank) on the family's targets, random conditions of the
model's shapes (``DenoiserFamily.example_cond``: no text encoder), one batch. Per mode: ``launch_ops`` (aten ops
that launch work, views excluded: ``catfast.bench.launches``), ``host_syncs``, and wall / process-CPU ms per step
(median; the modes alternate step by step after a warm-up round), and the fused step's loss and gradient error
against the reference. The reference mode is the official CAT code's three calls (adapter on c, base on c-
under no_grad, adapter on c-).
"""

from __future__ import annotations

import statistics
import time

import torch

from catfast.bench.launches import count_step
from catfast.bench.measure import cpu_name, git_commit, rel_err
from catfast.train.flow_objective import MODES, flow_cat_loss, sample_flow_inputs

MODELS = ("tiny-flux", "tiny-sd3", "tiny-qwenimage", "flux-narrow")


def bench_dit_step(
    model: str = "tiny-flux", *, batch: int = 1, steps: int = 5, rank: int = 16, side: int = 16, tokens: int = 32
) -> dict:
    """The figures of the module docstring for DiT ``model`` (``MODELS``) on latents ``[batch, C, side, side]``
    and ``tokens`` text tokens."""
    from peft import LoraConfig  # lazy: peft

    from catfast.integrations.factory_dit import FAMILY_OF_NAME, build_transformer  # lazy: diffusers
    from catfast.integrations.families import FAMILIES
    from catfast.integrations.peft_adapters import randomize_lora_

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    family = FAMILIES[FAMILY_OF_NAME[model]]
    transformer = build_transformer(model).requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(family.default_targets)))
    randomize_lora_(transformer, seed=0, std=0.02)
    params = [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, family.latent_channels(transformer), side, side, generator=g)
    noise, sigmas = sample_flow_inputs(family, latents, generator=g)
    cond, stripped = (family.example_cond(transformer, batch, tokens, g) for _ in range(2))

    def step(mode: str):
        for p in params:
            p.grad = None
        out = flow_cat_loss(family, transformer, latents, noise, sigmas, cond, stripped, mode=mode)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in params]

    results = {mode: step(mode) for mode in MODES}  # warm-up round, and the parity figures
    counts = {mode: count_step(lambda m=mode: step(m)) for mode in MODES}
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(steps):
        for mode in MODES:
            t0, c0 = time.perf_counter(), time.process_time()
            step(mode)
            wall[mode].append((time.perf_counter() - t0) * 1e3)
            cpu[mode].append((time.process_time() - c0) * 1e3)
    modes = {
        mode: dict(
            launch_ops=counts[mode].launch_ops,
            host_syncs=counts[mode].host_syncs,
            median_ms=round(statistics.median(wall[mode]), 2),
            median_cpu_ms=round(statistics.median(cpu[mode]), 2),
        )
        for mode in MODES
    }
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["fused"]
    modes["fused"]["loss_rel_err"] = rel_err(loss, ref_loss)
    modes["fused"]["grad_rel_err"] = max(rel_err(a, b) for a, b in zip(grads, ref_grads))
    return dict(
        bench="dit-step",
        model=model,
        family=family.name,
        batch=batch,
        rank=rank,
        latent_side=side,
        text_tokens=tokens,
        steps=steps,
        threads=torch.get_num_threads(),
        device="cpu",
        cpu=cpu_name(),
        commit=git_commit(),
        modes=modes,
        fused_vs_reference=dict(
            launch_ops=round(modes["fused"]["launch_ops"] / modes["reference"]["launch_ops"], 3),
            speed=round(modes["reference"]["median_ms"] / modes["fused"]["median_ms"], 3),
        ),
    )
