"""GPU memory and time of one whole CAT training step in the trainer's layout, MEASURED on CUDA: what fits on a
6, 8, 12 and 24 GB card, and catfast's steps against the official CAT step.

Per configuration (model at its native size: SD1.5 at 512 px, SDXL at 1024 px; batch 1; LoRA rank r on the
attention projections; gradient checkpointing off/on) and per step (catfast's fused CAT step on its Triton
kernels and on cuBLAS GEMMs (``fused-torch``), its reference step, the official CAT step with its second fp32
UNet), a fresh UNet is built directly on the GPU in bf16 with random weights, the LoRA parameters in fp32 with
AdamW under bf16 autocast, as ``catfast train --mixed-precision bf16`` sets it up (the fused step on a UNet
patched once, as the trainer does). Full steps (loss, backward, optimizer step) run: two warm-ups, then
``--steps`` timed ones (median). The peak of ``torch.cuda.max_memory_allocated`` over the timed steps is
reported with everything resident (weights, the official teacher copy, LoRA state, activations). Allocator
reserve above that and the CUDA context (about 0.5 GiB) come on top on a real card.
One JSON line per configuration; ``--profile`` adds one line per step with the top CUDA kernels and the
host-device synchronisations of one step.

  python benchmarks/cuda_memory.py [--models sd15,sdxl] [--ranks 1,16] [--steps 5] [--profile] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

from catfast.bench.contestants import make_contestant
from catfast.integrations.factory import unet_config
from catfast.integrations.patch import patch_unet
from catfast.integrations.schedulers import SCHEDULER_CONFIG
from catfast.train.objective import cat_loss

GIB = 2**30
BUDGETS = (6, 8, 12, 24)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet(model: str, dtype: torch.dtype) -> UNet2DConditionModel:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            return UNet2DConditionModel(**unet_config(model)).requires_grad_(False)
    finally:
        torch.set_default_dtype(default)


def _batch(unet) -> dict:
    cfg, g = unet.config, torch.Generator(device="cuda").manual_seed(1)
    side = cfg.sample_size

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    args = dict(
        latents=rand(1, cfg.in_channels, side, side),
        noise=rand(1, cfg.in_channels, side, side),
        timesteps=torch.tensor([500], device="cuda"),
        cond=rand(1, 77, cfg.cross_attention_dim),
        cond_stripped=rand(1, 77, cfg.cross_attention_dim),
    )
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeds and size ids per call
        extra = {"text_embeds": rand(1, 1280), "time_ids": rand(1, 6)}
        for k in ("cond", "cond_stripped"):
            args[k] = {"encoder_hidden_states": args[k], "added_cond_kwargs": extra}
    return args


def _setup(model: str, rank: int, ckpt: bool, step: str):
    """(unet, LoRA parameters, the loss function) for one configuration, in the trainer's layout."""
    unet = _unet(model, torch.bfloat16)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    if step.startswith("fused"):  # patched once, before checkpointing is on, as catfast.train does
        patch_unet(unet)
    if ckpt:
        unet.enable_gradient_checkpointing()
        unet.train()
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    args = _batch(unet)
    if step == "official":
        contestant = make_contestant("official", unet, sched, lambda: _unet(model, torch.float32))
        return unet, lora, lambda: contestant.loss(**args)
    if step == "fused-torch":  # the row-planned layers on cuBLAS GEMMs instead of catfast's Triton kernels
        return unet, lora, lambda: _with_backend("torch", lambda: cat_loss(unet, sched, **args, mode="fused"))
    return unet, lora, lambda: cat_loss(unet, sched, **args, mode=step)


def _with_backend(name: str, fn):
    old = os.environ.get("CATFAST_BACKEND")
    os.environ["CATFAST_BACKEND"] = name
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["CATFAST_BACKEND"]
        else:
            os.environ["CATFAST_BACKEND"] = old


def _one_step(loss_fn, opt) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = loss_fn()
    out.total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(model: str, rank: int, ckpt: bool, step: str, steps: int, profile: bool) -> list[dict]:
    gc.collect()
    torch.cuda.empty_cache()
    unet, lora, loss_fn = _setup(model, rank, ckpt, step)
    opt = torch.optim.AdamW(lora, lr=1e-4)
    for _ in range(2):
        _one_step(loss_fn, opt)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _one_step(loss_fn, opt)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated()
    row = dict(
        model=model,
        px=unet.config.sample_size * 8,
        rank=rank,
        ckpt=ckpt,
        step=step,
        peak_gib=round(peak / GIB, 3),
        fits=[b for b in BUDGETS if peak + GIB // 2 <= b * GIB],
        step_ms=round(statistics.median(times), 1),
        step_ms_all=[round(t, 1) for t in times],
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
    )
    rows = [row]
    if profile:
        rows.append(_profile(model, step, loss_fn, opt))
    return rows  # everything built here is freed with this frame; the next call collects before measuring


def _profile(model: str, step: str, loss_fn, opt) -> dict:
    """The top CUDA kernels and the CPU-side totals of one step, with host-device synchronisations counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _one_step(loss_fn, opt)
        torch.cuda.synchronize()
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::item"}
    return dict(
        profile=step,
        model=model,
        device_ms=round(sum(e.self_device_time_total for e in events) / 1e3, 1),
        top_kernels=[(e.key[:80], e.count, round(e.self_device_time_total / 1e3, 2)) for e in top],
        syncs=syncs,
        launches=sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--ranks", default="1,16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sdxl-ranks", default="16", help="SDXL's ranks (each SDXL step takes about a second)")
    ap.add_argument("--profile", action="store_true", help="profile one step of each, SD1.5 rank 16 without ckpt")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_memory.py measures CUDA memory: no CUDA device here")
    rows = []
    for model in a.models.split(","):
        ranks = a.sdxl_ranks if model == "sdxl" else a.ranks
        for rank in (int(r) for r in ranks.split(",")):
            for ckpt in (False, True):
                for step in ("fused", "fused-torch", "reference", "official"):
                    profile = a.profile and model == "sd15" and rank == 16 and not ckpt
                    try:
                        got = measure(model, rank, ckpt, step, a.steps, profile)
                    except Exception as e:  # noqa: BLE001  one failing configuration must not hide the rest
                        got = [
                            dict(model=model, rank=rank, ckpt=ckpt, step=step, error=f"{type(e).__name__}: {e}"[:300])
                        ]
                    rows.extend(got)
                    for row in got:
                        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
