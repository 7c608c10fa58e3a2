"""`catfast train`: the CAT trainer around the fused step.

One run: load the base, scan the concept folders, cache VAE latents and text embeddings on disk,
attach a LoRA per concept (or one shared), then per optimizer step take ``grad_accum`` micro-batches
of ``cat_loss(mode="fused")`` (gradient clipping on the LoRA parameters, AdamW, an lr schedule,
mixed precision with loss scaling for fp16). Under ``torchrun`` (WORLD_SIZE > 1) every process takes
its contiguous share of each global batch of ``batch_size x world`` samples and the UNet is wrapped in
DistributedDataParallel; noise and timesteps are drawn for the whole global batch on every rank, so a
run on W processes computes what one process with the global batch computes. Only rank 0 writes.

Files in OUT: metrics.jsonl (one JSON object per step: step, loss, ldm, cat, lr, seconds — the step's
wall time), loss.png, samples/step-NNNNNNN.png (per prompt: base | adapter without the trigger |
adapter with the trigger), checkpoints/ (see `catfast.train.checkpoint`), config.json, and the adapter:
adapter.safetensors, or adapter-<trigger>.safetensors per concept with one adapter per concept.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from catfast.errors import CatfastError
from catfast.folders import ensure_writable_folder
from catfast.train.checkpoint import (
    TrainState,
    capture_rng,
    check_identities,
    check_resumable,
    content_identities,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    run_settings,
    save_checkpoint,
)
from catfast.train.config import TrainConfig

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METRICS = "metrics.jsonl"
# Files a run writes in OUT (an --overwrite run removes them first; the latent cache is kept).
OUTPUTS = ("checkpoints", "samples", METRICS, "loss.png", "config.json")


@dataclass
class TrainResult:
    """What a run did. ``adapters``: trigger -> adapter file (rank 0; empty on other ranks). ``lora``:
    the final trainable parameters by name (CPU copies, on every rank). ``steps_per_second``: optimizer
    steps per second of training, after the first step and without sampling and checkpoint time."""

    out: Path
    adapters: dict[str, Path]
    steps: int
    start_step: int
    seconds: float
    steps_per_second: float | None
    last: dict[str, float]
    mode: str = "reference"  # the CAT step mode that ran (config.mode, or what "auto" chose)
    mode_reason: str = ""
    lora: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the adapter(s) ``config`` describes; see the module docstring. ``resume`` continues from the
    newest checkpoint in OUT/checkpoints (refused when its settings differ); ``overwrite`` starts over in
    an OUT that holds an earlier run's files."""
    config.validate()
    dist = _init_distributed()
    try:
        return _train(config, dist, resume=resume, overwrite=overwrite, progress=progress and dist.main)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, dist: _Dist, *, resume: bool, overwrite: bool, progress: bool) -> TrainResult:
    from catfast.integrations.models import resolve_base
    from catfast.train.objective import auto_mode, cat_loss
    from catfast.train.retention import Retention

    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    resume_from, earlier = _prepare_out(out, config, dist, resume=resume, overwrite=overwrite)
    device = _device(config, dist)
    weight_dtype = DTYPES[config.mixed_precision]
    _seed_everything(config.seed)

    examples = _scan(config)  # bad data fails before any model work
    base = resolve_base(config.base, config=config.base_config, device=device)
    dataset = _build_dataset(base, examples, config, out, device, dist, progress)
    identities = content_identities(base, dataset.digests, [str(e.image) for e in dataset.examples])
    # --cat-prompts / --bank / --keep: inputs checked (and kept adapters merged) before OUT changes; None: off
    retention = Retention.prepare(config, base, device, weight_dtype)
    if resume_from is not None:
        check_identities(resume_from, identities)
    else:  # every input check passed: only now is an earlier run's output replaced and config.json written
        _start_out(out, earlier, config, dist)

    unet = base.unet
    names, params = _add_adapters(unet, config)
    if weight_dtype != torch.float32:  # half frozen UNet, fp32 LoRA weights (peft's cast_training_params)
        torch.nn.Module.to(unet, weight_dtype)  # not diffusers' .to, which warns about this very cast
        for p in params.values():
            p.data = p.data.float()
    mode, mode_reason = (config.mode, "set by the config")
    if config.mode == "auto":  # before checkpointing is on: the trainer patches the UNet once for fused
        mode, mode_reason = auto_mode(unet, device, per_sample_adapters=True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if dist.main:
        logging.getLogger("catfast.train").info("CAT step mode %s: %s", mode, mode_reason)
    if mode == "fused":  # patched once: cat_loss would otherwise patch and unpatch every call
        from catfast.integrations.patch import patch_unet

        patch_unet(unet, names)
    model = unet
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            unet,
            device_ids=[dist.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=len(names) > 1,  # a batch may hold no sample of some concept
            broadcast_buffers=False,
        )

    trainable = list(params.values())
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        # fused: one kernel for all LoRA tensors on CUDA. The dev CPU, 140 LoRA tensors: foreach 1.9 ms,
        # per tensor 3.2 ms, fused 440 ms per step
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    noise_gen = torch.Generator().manual_seed(config.seed)
    timestep_probs = _timestep_probs(config, base.scheduler)
    num_timesteps = base.scheduler.config.num_train_timesteps

    start_step, epoch, batch_index = 0, 0, 0
    history: list[float] = []
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _load_lora(params, state.lora, resume_from)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            scaler.load_state_dict(state.scaler)
        restore_rng(state.rng, noise_gen)
        start_step, epoch, batch_index = state.step, state.epoch, state.batch_index
        if dist.main:
            history = _truncate_metrics(out / METRICS, start_step)

    global_batch = config.batch_size * dist.world
    batches = _BatchStream(dataset, global_batch, config.seed, epoch, batch_index)
    # each sample's adapter, by concept (all on the one adapter when it is shared); named explicitly,
    # since a patched UNet has no peft layers left for diffusers' active_adapters() to report
    adapter_of_concept = names if len(names) > 1 else names * len(config.concepts)
    metrics = _MetricsWriter(out / METRICS, history) if dist.main else None
    sample_plan = _SamplePlan(config, examples, names) if dist.main and config.sample_every else None
    settings = run_settings(config, dist.world)
    config_hash = config.result_hash()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_timed = None  # training time after the first step, without sampling and checkpoints
    timed_steps, excluded = 0, 0.0
    last = {}
    for step in range(start_step + 1, config.steps + 1):
        t0 = time.perf_counter()
        stats = torch.zeros(3 if retention is None else 5, device=device)
        for micro in range(config.grad_accum):
            keys, start, n, count = batches.next_shard(dist)
            batch = _collate(dataset, keys, device, weight_dtype)
            # drawn for the whole global batch on every rank: W processes compute what one would
            mine = slice(start, start + len(keys))
            noise = torch.randn((n, *batch["latents"].shape[1:]), generator=noise_gen)[mine]
            timesteps = _sample_timesteps(timestep_probs, n, noise_gen, num_timesteps)[mine]
            sync = micro == config.grad_accum - 1 or dist.world == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                step_loss = cat_loss if retention is None else functools.partial(retention.loss, generator=noise_gen)
                loss = step_loss(
                    model,
                    base.scheduler,
                    latents=batch["latents"],
                    noise=noise.to(device),
                    timesteps=timesteps.to(device),
                    cond=batch["cond"],
                    cond_stripped=batch["cond_stripped"],
                    mode=mode,
                    adapters=_adapters(adapter_of_concept, batch["concepts"]),
                    **({"cat_weight": config.cat_weight, "snr_gamma": config.snr_gamma} if retention is None else {}),
                )
                # DDP averages the ranks' gradients; weighting each rank's mean by its share of the
                # global batch makes that average the global batch's mean
                scale = count * dist.world / n / config.grad_accum
                scaler.scale(loss.total * scale).backward()
            terms = [loss.total, loss.ldm, loss.cat] + ([loss.keep, loss.bank] if retention is not None else [])
            stats += torch.stack([t.detach() for t in terms]) * scale
        if config.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.world > 1:  # the logged loss is the global batch's (each rank's share is weighted)
            torch.distributed.all_reduce(stats)
            stats /= dist.world

        values = stats.tolist()  # the one host sync per step: the metrics line and the progress bar need it
        seconds = time.perf_counter() - t0
        last = {"loss": values[0], "ldm": values[1], "cat": values[2]}
        if retention is not None:
            last.update(keep=values[3], bank=values[4])
        if not math.isfinite(values[0]) and config.mixed_precision != "fp16":
            raise CatfastError(f"the loss is {values[0]} at step {step}; lower the lr ({config.lr}) or check the data")
        if metrics is not None:
            record = {"step": step, **last, "lr": lr, "seconds": round(seconds, 6), "mode": mode}
            if step == start_step + 1:  # the run's first line says why (config.mode "auto" decides per run)
                record["mode_reason"] = mode_reason
            metrics.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{values[0]:.4f}", ldm=f"{values[1]:.4f}", cat=f"{values[2]:.2e}", refresh=False)
            bar.update(1)
        if t_timed is None:
            t_timed = time.perf_counter()
        else:
            timed_steps += 1

        t_extra = time.perf_counter()
        # the last step too: a later --resume with more --steps continues from it instead of redoing steps
        if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
            state = TrainState(
                step=step,
                epoch=batches.epoch,
                batch_index=batches.index,
                lora=params,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                rng=capture_rng(noise_gen),
                settings=settings,
                config_hash=config_hash,
                identities=identities,
            )
            if dist.main:
                save_checkpoint(ckpt_dir, state, keep=config.keep_checkpoints)
                metrics.plot(out / "loss.png")
            dist.barrier()  # no rank runs ahead of a checkpoint that may be resumed from
        if sample_plan is not None and (step % config.sample_every == 0 or step == config.steps):
            sample_plan.run(base, out / "samples" / f"step-{step:07d}.png")
        excluded += time.perf_counter() - t_extra
    if bar is not None:
        bar.close()
    total = time.perf_counter() - t_start
    rate = None
    if timed_steps:
        rate = timed_steps / (time.perf_counter() - t_timed - excluded)

    files: dict[str, Path] = {}
    final = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    if dist.main:
        if mode == "fused":
            from catfast.integrations.patch import unpatch_unet

            unpatch_unet(unet)
        files = _write_adapters(unet, config, names, out, examples)
        metrics.plot(out / "loss.png")
        metrics.close()
    dist.barrier()
    return TrainResult(
        out=out,
        adapters=files,
        steps=config.steps,
        start_step=start_step,
        seconds=total,
        steps_per_second=rate,
        last=last,
        mode=mode,
        mode_reason=mode_reason,
        lora=final,
    )


# ---------------------------------------------------------------------------------------------- setup


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend)
    return _Dist(rank=rank, world=world, local_rank=local_rank)


def _device(config: TrainConfig, dist: _Dist) -> torch.device:
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CatfastError("device = cuda, but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _prepare_out(
    out: Path, config: TrainConfig, dist: _Dist, *, resume: bool, overwrite: bool
) -> tuple[Path | None, list[str]]:
    """Check (and on rank 0 create) OUT before any model work. Returns the checkpoint to resume from (or
    None) and the names of an earlier run's files in OUT, which `_start_out` replaces once the inputs
    passed their checks (a run that fails them leaves OUT as it was)."""
    if out.exists() and not out.is_dir():
        raise CatfastError(f"{out}: the output path exists and is not a folder")
    ckpt_dir = out / "checkpoints"
    if resume:
        if overwrite:
            raise CatfastError("--resume continues the run in OUT and --overwrite starts it over; pass one")
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise CatfastError(f"--resume: no checkpoint in {ckpt_dir}; start the run without --resume")
        step, latest = found[-1]
        check_resumable(latest, config, dist.world)
        if step >= config.steps:
            raise CatfastError(f"--resume: {latest} is at step {step}, and steps is {config.steps}; raise --steps")
        return latest, []
    ours = [name for name in OUTPUTS if (out / name).exists()] + [p.name for p in _adapter_files(out)]
    if ours and not overwrite:
        hint = "pass --resume to continue it, or " if list_checkpoints(ckpt_dir) else ""
        raise CatfastError(
            f"{out} holds an earlier run ({', '.join(sorted(ours))}); {hint}pass --overwrite to start over"
        )
    dist.barrier()  # every rank has looked at OUT before rank 0 writes to it
    if dist.main:
        ensure_writable_folder(out, CatfastError)
    dist.barrier()
    return None, ours


def _start_out(out: Path, earlier: list[str], config: TrainConfig, dist: _Dist) -> None:
    """Remove an earlier run's files (``--overwrite``; the latent cache is kept) and write config.json."""
    from catfast.folders import write_atomic

    if dist.main:
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        write_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True).encode())
    dist.barrier()


def _adapter_files(out: Path) -> list[Path]:
    return sorted(out.glob("adapter*.safetensors")) if out.is_dir() else []


def _scan(config: TrainConfig):
    from catfast.train.data import Concept, scan_concepts

    concepts = [Concept(Path(c.data), c.trigger) for c in config.concepts]
    examples = scan_concepts(concepts, prepend_trigger=config.prepend_trigger, on_bad_image=config.on_bad_image)
    if not examples:
        raise CatfastError(f"no training images in {', '.join(c.data for c in config.concepts)}")
    return examples


def _build_dataset(base, examples, config: TrainConfig, out: Path, device, dist: _Dist, progress: bool):
    """The cached latents and text embeddings. Rank 0 encodes what is missing first; the other ranks then
    find every entry in the cache (no two processes write one entry). Encoded in fp32 whatever the
    mixed precision (the entries are shared by runs of either); the trainer casts per batch."""
    from catfast.train.cache import build_cache
    from catfast.train.data import Transform

    resolution = config.resolution or base.unet.config.sample_size * base.vae_scale_factor
    transform = Transform(
        resolution=resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        buckets=config.buckets,
        crop_variants=1 if config.center_crop else config.crop_variants,
        allow_upscale=config.allow_upscale,
    )
    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
    dataset = None
    if dist.main:
        dataset = build_cache(base, examples, transform, cache_dir, device=device, progress=progress)
    dist.barrier()
    if not dist.main:
        dataset = build_cache(base, examples, transform, cache_dir, device=device, progress=False)
    return dataset


def _add_adapters(unet, config: TrainConfig) -> tuple[list[str], dict[str, torch.nn.Parameter]]:
    """Attach the LoRA adapter(s); returns their names and the trainable parameters by name (sorted)."""
    from catfast.integrations.peft_adapters import add_lora

    count = len(config.concepts) if config.concept_adapters == "per-concept" else 1
    names = ["default"] if count == 1 else [f"concept{i}" for i in range(count)]
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in names:
            add_lora(unet, rank=config.rank, alpha=config.lora_alpha, target_modules=config.targets, adapter_name=name)
    if len(names) > 1:
        unet.set_adapter(names)
    pattern = re.compile(r"\.lora_[AB]\.(" + "|".join(map(re.escape, names)) + r")\.weight$")
    params = {n: p for n, p in sorted(unet.named_parameters()) if pattern.search(n)}
    if not params:
        raise CatfastError(f"no module of the UNet matches the LoRA targets {config.targets}")
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return names, params


def _adapters(adapter_of_concept: list[str], concepts: torch.Tensor) -> list[str]:
    return [adapter_of_concept[c] for c in concepts.tolist()]


def _load_lora(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], where: Path) -> None:
    if set(saved) != set(params):
        raise CatfastError(f"{where}: the checkpoint's LoRA parameters do not match this run's adapters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def _lr_lambda(config: TrainConfig):
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


def _timestep_probs(config: TrainConfig, scheduler) -> torch.Tensor | None:
    """None for uniform timesteps; for Diff-Tuning's chain of forgetting (cat-method.md §2.2), the
    categorical P(t) proportional to (t + 1) ** timestep_power over the scheduler's T training steps:
    noisy timesteps, where the base model's knowledge transfers least, are trained most. Both CAT terms
    share each sample's t, as the CAT loss requires."""
    T = scheduler.config.num_train_timesteps
    if config.timesteps == "uniform":
        return None
    probs = torch.arange(1, T + 1, dtype=torch.float64) ** config.timestep_power
    return (probs / probs.sum()).float()


def _sample_timesteps(probs: torch.Tensor | None, n: int, gen: torch.Generator, num: int) -> torch.Tensor:
    if probs is None:
        return torch.randint(0, num, (n,), generator=gen)
    return torch.multinomial(probs, n, replacement=True, generator=gen)


# ----------------------------------------------------------------------------------------------- data


class _BatchStream:
    """Walks ``batch_order(dataset, global_batch, seed, epoch)`` epoch after epoch. The position
    (``epoch``, ``index``) names the next global batch; checkpoints store it."""

    def __init__(self, dataset, global_batch: int, seed: int, epoch: int, index: int):
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.epoch, self.index = epoch, index
        self.order = self._order(epoch)

    def _order(self, epoch: int):
        from catfast.train.cache import batch_order

        return batch_order(self.dataset, self.global_batch, self.seed, epoch)

    def next_shard(self, dist: _Dist) -> tuple[list, int, int, int]:
        """(keys to compute, their offset in the next global batch, the global batch size, how many of
        the keys count). A rank's share is contiguous; a rank left without samples (a short last batch)
        computes the batch's first sample with weight 0, since every DDP rank must run each step."""
        if self.index >= len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        keys = [tuple(k) for k in self.order[self.index]]
        self.index += 1
        n = len(keys)
        sizes = [n // dist.world + (1 if r < n % dist.world else 0) for r in range(dist.world)]
        start, count = sum(sizes[: dist.rank]), sizes[dist.rank]
        if count == 0:
            return keys[:1], 0, n, 0
        return keys[start : start + count], start, n, count


def _collate(dataset, keys, device, dtype) -> dict:
    from catfast.train.cache import collate

    batch = collate([dataset[k] for k in keys])
    return {
        "latents": batch["latents"].to(device, non_blocking=True),
        "cond": _to(batch["cond"], device, dtype),
        "cond_stripped": _to(batch["cond_stripped"], device, dtype),
        "concepts": batch["concepts"],
    }


def _to(cond, device, dtype):
    if isinstance(cond, torch.Tensor):
        return cond.to(device, dtype, non_blocking=True)
    return {k: _to(v, device, dtype) for k, v in cond.items()} if isinstance(cond, dict) else cond


# -------------------------------------------------------------------------------------------- outputs


class _MetricsWriter:
    """Appends one JSON line per step to metrics.jsonl, flushed, and keeps the losses for loss.png."""

    def __init__(self, path: Path, history: list[float]):
        self.path, self.losses = path, list(history)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.losses.append(record["loss"])

    def plot(self, path: Path) -> None:
        if self.losses:
            write_loss_plot(self.losses, path)

    def close(self) -> None:
        self.file.close()


def _truncate_metrics(path: Path, step: int) -> list[float]:
    """Drop the lines of steps after ``step`` (a killed run went past its last checkpoint); returns the
    losses of the remaining lines."""
    if not path.is_file():
        return []
    kept, losses = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
            losses.append(record["loss"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return losses


def write_loss_plot(losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A PNG line plot of the per-step loss (grey) and its moving average (blue), drawn with PIL."""
    import io

    from PIL import Image, ImageDraw

    from catfast.folders import write_atomic

    w, h = size
    left, right, top, bottom = 56, 12, 12, 28
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    finite = [v for v in losses if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(losses)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, n - 1))
        return x, top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    window = max(1, n // 20)
    smooth, acc = [], 0.0
    for i, v in enumerate(losses):
        acc += v if math.isfinite(v) else 0.0
        if i >= window:
            acc -= losses[i - window] if math.isfinite(losses[i - window]) else 0.0
        smooth.append(acc / min(i + 1, window))
    for series, color in ((losses, (170, 170, 170)), (smooth, (31, 119, 180))):
        points = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=1 if color[0] == 170 else 2)
    draw.text((4, top), f"{hi:.4g}", fill="black")
    draw.text((4, h - bottom - 10), f"{lo:.4g}", fill="black")
    draw.text((left, h - bottom + 6), "step 1", fill="black")
    draw.text((w - right - 60, h - bottom + 6), f"step {n}", fill="black")
    draw.text((left + 8, top + 4), "loss", fill=(31, 119, 180))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


class _SamplePlan:
    """The sample grid: per prompt (and concept) one row of base | adapter without the trigger |
    adapter with the trigger, from one batched sampler run with fixed seeds."""

    def __init__(self, config: TrainConfig, examples, names: list[str]):
        from catfast.train.captions import has_trigger, strip_trigger

        self.config = config
        rows = []  # (label, prompt without trigger, prompt with trigger, adapter name)
        for k, concept in enumerate(config.concepts):
            adapter = names[k] if len(names) > 1 else names[0]
            prompts = config.sample_prompts or [next(e.caption_stripped for e in examples if e.concept == k)]
            for prompt in prompts:
                trigger = concept.trigger
                if has_trigger(prompt, trigger):
                    with_t, without = prompt, strip_trigger(prompt, trigger)
                else:
                    with_t, without = f"{trigger}, {prompt}", prompt
                rows.append((f"{trigger}: {without}"[:60], without, with_t, adapter))
        self.rows = rows

    def run(self, base, path: Path) -> None:
        from catfast.eval.grids import save_grid
        from catfast.eval.sampler import sample_images

        prompts, adapters, seeds = [], [], []
        cols = 3 if self.config.sample_base else 2
        for i, (_, without, with_t, adapter) in enumerate(self.rows):
            row = ([(without, None)] if self.config.sample_base else []) + [(without, adapter), (with_t, adapter)]
            for prompt, name in row:
                prompts.append(prompt)
                adapters.append(name)
                seeds.append(self.config.sample_seed + i)
        with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG
            images = sample_images(
                base,
                prompts,
                adapters=adapters,
                seeds=seeds,
                steps=self.config.sample_steps,
                guidance=self.config.sample_guidance,
            )
        labels = [f"{r[0]} (seed {self.config.sample_seed + i})" for i, r in enumerate(self.rows)]
        heads = (["base"] if self.config.sample_base else []) + ["without trigger", "with trigger"]
        save_grid(images, len(self.rows), cols, path, labels=labels, col_labels=heads)


def _write_adapters(unet, config: TrainConfig, names: list[str], out: Path, examples) -> dict[str, Path]:
    """The final adapter file(s): adapter.safetensors, or adapter-<trigger>.safetensors per concept. The
    metadata records the triggers and the training captions (`--keep` distills on them later)."""
    from catfast.adapters.formats import write_adapter
    from catfast.integrations.peft_adapters import extract_adapter
    from catfast.train.lifelong import TRIGGER_PROMPTS, trigger_prompts_metadata

    files = {}
    for k, name in enumerate(names):
        adapter = extract_adapter(unet, name)
        triggers = [c.trigger for c in config.concepts] if len(names) == 1 else [config.concepts[k].trigger]
        adapter.metadata.update({"catfast.triggers": json.dumps(triggers), "catfast.steps": str(config.steps)})
        mine = [e.caption for e in examples if len(names) == 1 or e.concept == k]
        adapter.metadata[TRIGGER_PROMPTS] = trigger_prompts_metadata(mine)
        if len(names) == 1:
            path = out / "adapter.safetensors"
        else:
            path = out / f"adapter-{re.sub(r'[^A-Za-z0-9_.-]+', '_', triggers[0])}.safetensors"
        try:
            write_adapter(adapter, path, format=config.format, overwrite=True)
        except OSError as e:
            raise CatfastError(f"{path}: cannot write the adapter: {e.strerror or e}") from None
        for trigger in triggers:
            files[trigger] = path
    return files
