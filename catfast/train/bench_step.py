"""`catfast bench train-step`: the reference and the fused CAT step, interleaved in one process.

For each mode, one step is cat_loss forward + backward on a random-weight UNet (catfast's factories)
with a LoRA on every attention projection (the CAT paper's targets) and random, nonzero B. Reported:
median wall time over the timed steps, forward and backward FLOPs (torch.utils.flop_counter), bytes
saved for backward (unique storages packed by autograd, parameters excluded; saved_tensors_hooks),
peak device memory (CUDA only), and the parity of loss and LoRA gradients between the modes. On a
GPU the reference under torch.compile is timed too.
"""

from __future__ import annotations

import statistics
import subprocess
import time

import torch

from catfast.testing import flop_counter, rel_err
from catfast.train.objective import cat_loss

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TOKENS = 77


def _setup(model: str, batch: int, rank: int, dtype: torch.dtype, device: str, seed: int, targets=TARGETS):
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from catfast.integrations.factory import SCHEDULER_CONFIG, build_unet
    from catfast.testing import randomize_lora_

    unet = build_unet(model, seed=seed).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    randomize_lora_(unet, seed=seed + 1, std=0.1)
    unet.to(device=device, dtype=dtype)
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    side = cfg.sample_size

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    batch_args = dict(
        latents=rand(batch, cfg.in_channels, side, side),
        noise=rand(batch, cfg.in_channels, side, side),
        timesteps=torch.randint(0, 1000, (batch,), generator=g).to(device),
        cond=rand(batch, TOKENS, cfg.cross_attention_dim),
        cond_stripped=rand(batch, TOKENS, cfg.cross_attention_dim),
    )
    return unet, DDPMScheduler(**SCHEDULER_CONFIG), batch_args


def _step(unet, sched, batch_args, mode, loss_fn=cat_loss):
    unet.zero_grad(set_to_none=True)
    out = loss_fn(unet, sched, **batch_args, mode=mode)
    out.total.backward()
    return out


def _measure_once(unet, sched, batch_args, mode) -> dict:
    """FLOPs of forward and backward, and unique bytes autograd saved (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    unet.zero_grad(set_to_none=True)
    with flop_counter() as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = cat_loss(unet, sched, **batch_args, mode=mode)
    with flop_counter() as bwd:
        out.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    return dict(
        fwd_flops=fwd.get_total_flops(),
        bwd_flops=bwd.get_total_flops(),
        saved_bytes=sum(storages.values()),
        out=out,
        grads=grads,
    )


def bench_train_step(
    model: str = "tiny",
    batch: int = 1,
    steps: int = 5,
    *,
    rank: int = 4,
    dtype: str = "fp32",
    device: str | None = None,
    seed: int = 0,
    targets: tuple[str, ...] | list[str] = TARGETS,
) -> dict:
    """Run the benchmark and return the result object (see the module docstring)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    unet, sched, batch_args = _setup(model, batch, rank, torch_dtype, device, seed, targets)
    modes = ["reference", "fused"]
    results = {m: _measure_once(unet, sched, batch_args, m) for m in modes}
    loss_fns = {m: cat_loss for m in modes}
    if device == "cuda":
        compiled = torch.compile(unet)
        modes.append("reference_compiled")
        loss_fns["reference_compiled"] = lambda _u, *a, **k: cat_loss(compiled, *a, **{**k, "mode": "reference"})
        results["reference_compiled"] = {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, int | None] = {m: None for m in modes}
    for i in range(steps + 1):  # the first round warms up (and compiles)
        for m in modes:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            _step(unet, sched, batch_args, "reference" if m == "reference_compiled" else m, loss_fns[m])
            sync()
            if i:
                times[m].append((time.perf_counter() - t0) * 1e3)
            if device == "cuda":
                peaks[m] = torch.cuda.max_memory_allocated()

    ref, fused = results["reference"], results["fused"]
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": dtype,
        "model": model,
        "batch": batch,
        "rank": rank,
        "targets": list(targets),
        "steps": steps,
        "latent": list(batch_args["latents"].shape[1:]),
        "torch": torch.__version__,
        "git": _git(),
        "modes": {},
        "parity": {
            "loss_rel_err": max(
                rel_err(getattr(fused["out"], k).detach(), getattr(ref["out"], k).detach())
                for k in ("total", "ldm", "cat")
            ),
            "grad_rel_err": max(rel_err(fused["grads"][n], g) for n, g in ref["grads"].items()),
        },
    }
    for m in modes:
        r = results[m]
        out["modes"][m] = {
            "median_ms": round(statistics.median(times[m]), 3),
            "fwd_flops": r.get("fwd_flops"),
            "bwd_flops": r.get("bwd_flops"),
            "saved_bytes": r.get("saved_bytes"),
            "peak_bytes": peaks[m],
        }
    out["speedup"] = round(out["modes"]["reference"]["median_ms"] / out["modes"]["fused"]["median_ms"], 3)
    return out


def _git() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except OSError:
        return None
