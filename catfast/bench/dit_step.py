"""`catfast bench dit-step` (also `bench train-step --model <DiT>`): the flow-matching CAT step on a diffusion
transformer, catfast's modes against today's step and a plain LoRA step.

One step (forward + backward) on the same transformer with a random LoRA (A and B drawn, alpha = rank) on the
family's targets, random conditions of the model's shapes (``DenoiserFamily.example_cond``: no text encoder),
one batch. Entries:

- ``plain``: a plain LoRA step (``flow_cat_loss`` with ``cat_weight=0``: one call on the trigger caption);
- ``ai-toolkit``: ostris/ai-toolkit's differential output preservation (``extensions_built_in/sd_trainer/
  SDTrainer.py``: ``get_prior_prediction`` runs the transformer under ``no_grad`` with the network inactive on
  the class prompt, then ``train_single_accumulation`` runs the trigger pass and the preservation pass with
  grad and adds ``mse(preservation_pred, prior_pred) * diff_output_preservation_multiplier``; one backward).
  The class prompt is the stripped caption and the multiplier 1, so its loss is CAT's;
- ``reference``, ``fused``, ``fused:teacher-first``: ``catfast.train.flow_objective.flow_cat_loss``'s modes
  (three calls; one row-planned call over 3B rows; a no_grad teacher call, then one over the 2B adapter rows).

Per entry: ``launch_ops`` (aten ops that launch work, views excluded: ``catfast.bench.launches``),
``host_syncs``, ``saved_bytes`` (unique storages autograd saves for backward, parameters excluded), wall and
process-CPU ms per step (median; the entries alternate step by step after a warm-up round), and, for every
CAT entry, the loss and LoRA-gradient error against the reference.
"""

from __future__ import annotations

import statistics
import time

import torch

from catfast.bench.launches import count_step
from catfast.bench.measure import SavedBytes, cpu_name, git_commit, rel_err
from catfast.integrations.families import lora_disabled
from catfast.train.flow_objective import flow_cat_loss, noisy_and_target, sample_flow_inputs

MODELS = ("tiny-flux", "tiny-sd3", "tiny-qwenimage", "flux-narrow")
ENTRIES = ("plain", "ai-toolkit", "reference", "fused", "fused:teacher-first")


def ai_toolkit_dop_loss(family, model, latents, noise, sigmas, cond, stripped) -> torch.Tensor:
    """ai-toolkit's differential output preservation step loss (module docstring), multiplier 1."""
    noisy, target = noisy_and_target(latents, noise, sigmas)
    with torch.no_grad(), lora_disabled(model):
        prior = family.predict(model, noisy, sigmas, stripped).float()
    loss = torch.nn.functional.mse_loss(family.predict(model, noisy, sigmas, cond).float(), target)
    preservation = family.predict(model, noisy, sigmas, stripped).float()
    return loss + torch.nn.functional.mse_loss(preservation, prior)


def bench_dit_step(
    model: str = "tiny-flux", *, batch: int = 1, steps: int = 5, rank: int = 16, side: int = 16, tokens: int = 32
) -> dict:
    """The figures of the module docstring for DiT ``model`` (``MODELS``) on latents ``[batch, C, side, side]``
    and ``tokens`` text tokens."""
    from catfast.integrations.factory_dit import FAMILY_OF_NAME, build_transformer  # lazy: diffusers
    from catfast.integrations.families import FAMILIES
    from catfast.integrations.peft_adapters import add_lora, randomize_lora_

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    family = FAMILIES[FAMILY_OF_NAME[model]]
    transformer = build_transformer(model)
    add_lora(transformer, rank=rank, alpha=rank, target_modules=family.default_targets)
    randomize_lora_(transformer, seed=0, std=0.02)
    params = [p for p in transformer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, family.latent_channels(transformer), side, side, generator=g)
    noise, sigmas = sample_flow_inputs(family, latents, generator=g)
    cond, stripped = (family.example_cond(transformer, batch, tokens, g) for _ in range(2))
    inputs = (family, transformer, latents, noise, sigmas, cond, stripped)
    losses = {
        "plain": lambda: flow_cat_loss(*inputs, cat_weight=0.0).loss,
        "ai-toolkit": lambda: ai_toolkit_dop_loss(*inputs),
        "reference": lambda: flow_cat_loss(*inputs, mode="reference").loss,
        "fused": lambda: flow_cat_loss(*inputs, mode="fused").loss,
        "fused:teacher-first": lambda: flow_cat_loss(*inputs, mode="fused", layout="teacher-first").loss,
    }

    def step(name: str):
        for p in params:
            p.grad = None
        loss = losses[name]()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    results = {name: step(name) for name in ENTRIES}  # warm-up round, and the parity figures
    counts = {name: count_step(lambda n=name: step(n)) for name in ENTRIES}
    saved = {}
    for name in ENTRIES:
        with SavedBytes(transformer) as s:
            loss = losses[name]()
        loss.backward()
        saved[name] = s.total
    wall: dict[str, list[float]] = {n: [] for n in ENTRIES}
    cpu: dict[str, list[float]] = {n: [] for n in ENTRIES}
    for _ in range(steps):
        for name in ENTRIES:
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    entries = {
        name: dict(
            launch_ops=counts[name].launch_ops,
            host_syncs=counts[name].host_syncs,
            saved_bytes=saved[name],
            median_ms=round(statistics.median(wall[name]), 2),
            median_cpu_ms=round(statistics.median(cpu[name]), 2),
        )
        for name in ENTRIES
    }
    ref_loss, ref_grads = results["reference"]
    for name in ("ai-toolkit", "fused", "fused:teacher-first"):
        loss, grads = results[name]
        entries[name]["loss_rel_err"] = rel_err(loss, ref_loss)
        entries[name]["grad_rel_err"] = max(rel_err(a, b) for a, b in zip(grads, ref_grads))

    def ratio(key: str, a: str, b: str) -> float:
        return round(entries[a][key] / entries[b][key], 3)

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
        entries=entries,
        fused_vs_reference=dict(launch_ops=ratio("launch_ops", "fused", "reference"),
                                speed=ratio("median_ms", "reference", "fused")),  # fmt: skip
        time_vs_plain={name: ratio("median_ms", name, "plain") for name in ENTRIES if name != "plain"},
    )
