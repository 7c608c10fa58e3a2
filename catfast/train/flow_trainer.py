"""`catfast train` on a diffusion transformer (Flux, SD3, Qwen-Image): the flow-matching CAT loop.

`trainer.train` sends here a base whose folder is a diffusers pipeline of a flow-matching family
(`recipes.dit_family`); UNet bases stay in trainer.py. One run:

1. refuses, in one line naming the option, what this path does not build (`check_supported`: --cuda-graphs,
   samples, kohya files, ...), then checks OUT as the UNet trainer does; reads the held prompts of --cat-prompts
   and --keep and the --bank folder (train/flow_held.py: extra CAT rows, kept adapters, bank rows, as
   docs/retention.md);
2. scans the concept folders (train/data.py: captions, triggers, kohya folders) and plans each image's
   variants (transform.Transform: resize, crops, flips, aspect buckets) at sides that are multiples of the VAE's
   scale x the family's 2x2 patch;
3. caches on disk, under OUT/cache (or cache_dir), one safetensors entry per image (train/flow_cache.py): its
   variants' latents ``[V, C, h, w]`` fp32 (`family.encode_latents`: a posterior sample seeded by the image's
   hash, so an entry is reproducible) and the condition dicts of its caption and trigger-stripped caption
   (`family.encode_prompt`, one caption per call: no padding). Only a build with misses loads the text
   encoders; they and the VAE run in fp32 (entries shared by runs of any precision) and are dropped before
   the transformer is loaded (T5-XXL and Qwen2.5-VL outweigh the LoRA's working set); under torchrun rank 0
   builds the cache first and the other ranks read it;
4. loads the transformer alone (the mixed precision's dtype), attaches one peft LoRA on ``config.targets``
   (the family's ``default_targets`` unless set; with ``--base-dtype fp8`` every other frozen Linear, the LoRA
   layers' base layers included, is then quantized to float8 e4m3 onto the device, one layer at a time:
   nn/fp8_linear.py, reference mode only), and per optimizer step runs ``grad_accum`` micro-batches of
   `flow_cat_loss` (noise and sigmas from `sample_flow_inputs` with the run's generator), clips the LoRA
   gradients, steps AdamW (fp32 LoRA parameters only) and the lr schedule. Under torchrun (WORLD_SIZE > 1)
   each process takes its contiguous share of a global batch of ``batch_size x world`` samples, noise and
   sigmas are drawn for the whole global batch on every rank, and the LoRA gradients are averaged in one
   all-reduce per step: W processes compute what one process with the global batch computes;
5. writes what the UNet trainer writes: config.json, metrics.jsonl (step, loss, ldm, cat, [keep, bank,] lr,
   seconds, mode), loss.png, checkpoints (`catfast.train.checkpoint`: --resume continues bit for bit), and
   adapter.safetensors in diffusers' format (``transformer.`` keys, rank and alpha in ``lora_adapter_metadata``:
   ``catfast.adapters.formats.write_adapter``), which ``pipe.load_lora_weights`` loads; only rank 0 writes. A
   checkpoint's lora.safetensors is that file as of its step, written with the checkpoint's other files before
   the folder lands (as the UNet trainer's).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from catfast.adapters.adapter import LoraAdapter
from catfast.adapters.formats import write_adapter
from catfast.errors import CatfastError
from catfast.integrations.families import DenoiserFamily
from catfast.integrations.peft_adapters import add_lora, extract_adapter
from catfast.nn.fp8_linear import quantize_frozen_linears_
from catfast.train import flow_objective
from catfast.train.batches import BatchStream
from catfast.train.checkpoint import (
    TrainState,
    capture_rng,
    check_identities,
    content_identities,
    load_checkpoint,
    remove_stale_partials,
    restore_rng,
    run_settings,
    save_checkpoint,
)
from catfast.train.config import TrainConfig
from catfast.train.dist import Dist
from catfast.train.flow_cache import FlowDataset, build_flow_cache
from catfast.train.flow_held import HeldPrompts
from catfast.train.lifelong import TRIGGER_PROMPTS, trigger_prompts_metadata
from catfast.train.outputs import METRICS, MetricsWriter, log_step, prepare_out, start_out, truncate_metrics
from catfast.train.run_parts import DTYPES, TrainResult, device_for, load_lora, scan_examples, seed_everything
from catfast.train.schedules import lr_lambda

log = logging.getLogger("catfast.train")
ADAPTER = "adapter.safetensors"


def train_flow(
    config: TrainConfig,
    dist: Dist,
    family: DenoiserFamily,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    announce=None,
) -> TrainResult:
    """Train one CAT LoRA on the transformer of the pipeline folder ``config.base`` (module docstring)."""
    check_supported(config, family, dist.world)
    mode, mode_reason = flow_mode(config)
    folder = Path(config.base).expanduser()
    out = Path(config.out)
    resume_from, earlier = prepare_out(out, config, dist, resume=resume, overwrite=overwrite)
    remove_stale_partials(out / "checkpoints")  # what a SIGKILLed run left, named as it goes
    device = device_for(config, dist)
    seed_everything(config.seed)
    examples = scan_examples(config)  # bad data fails before any model work
    held = HeldPrompts.read(config)  # a bad --cat-prompts file, --keep adapter or --bank folder fails here too
    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
    # rank 0 encodes what is missing first; the other ranks then find every entry in the cache
    dataset, freed = None, []
    if dist.main:
        dataset, freed = build_flow_cache(folder, family, examples, config, cache_dir, device, progress, held.prompts)
    dist.barrier()
    if not dist.main:
        dataset, freed = build_flow_cache(folder, family, examples, config, cache_dir, device, False, held.prompts)
    held.check_bank(tuple(dataset.entries[0].latents.shape[1:]))  # the bank rows join the concept rows' call
    identities = content_identities(SimpleNamespace(path=str(folder)), dataset.digests,
                                    [str(e.image) for e in dataset.examples])  # fmt: skip
    if resume_from is not None:
        check_identities(resume_from, identities)
    # the transformer with the kept adapters merged: a kept file that does not fit fails before OUT changes
    run = _FlowRun(config, dist, family, dataset, device, identities, examples, mode, mode_reason, held)
    run.freed = freed
    if resume_from is None:  # every input check passed: only now is an earlier run's output replaced
        start_out(out, earlier, config, dist)
    if announce is not None:
        announce(config.describe())
    if resume_from is not None:
        run.restore(resume_from)
    history = truncate_metrics(out / METRICS, run.start_step) if resume_from is not None else []
    if dist.main:
        run.metrics = MetricsWriter(out / METRICS, history)
    total, rate = run.loop(progress)
    return run.finish(total, rate)


# ------------------------------------------------------------------------------------------------ options


def check_supported(config: TrainConfig, family: DenoiserFamily, world: int) -> None:
    """Raise a one-line CatfastError naming the first option the DiT path does not build: such an option is
    refused, never ignored."""
    refused = [
        (config.cuda_graphs, "--cuda-graphs", "leave it off"),
        (config.bank is not None and world > 1, "--bank under torchrun", "train with --bank in one process"),
        (config.bank is not None and config.buckets, "--bank with --buckets", "the bank rows share one call: one size"),
        (config.snr_gamma is not None, "--snr-gamma (a DDPM weighting)", "the family's recipe weights the loss"),
        (config.timesteps != "uniform", f"--timesteps {config.timesteps}", "the family's recipe samples sigmas"),
        (config.mixed_precision == "fp16", "--mixed-precision fp16", "use bf16"),
        (config.sample_every > 0, "--sample-every", "set it to 0 and sample with the pipeline and load_lora_weights"),
        (config.format != "diffusers", f"--format {config.format}", "use diffusers"),
        (
            len(config.concepts) > 1 and config.concept_adapters == "per-concept",
            "one adapter per concept",
            "set concept_adapters = shared",
        ),  # fmt: skip
        (config.mode == "measure", "--mode measure", "use auto, fused or reference"),
        (config.base_config is not None, "--base-config", "a pipeline folder is complete without it"),
        (
            config.base_dtype == "fp8" and config.mode == "fused",
            "--mode fused with --base-dtype fp8",
            "use auto or reference (the row-planned LoRA layer reads its base weight in full precision)",
        ),
    ]
    for is_refused, option, hint in refused:
        if is_refused:
            raise CatfastError(f"{option} is not built for DiT bases ({family.name}) yet; {hint}")


def flow_mode(config: TrainConfig) -> tuple[str, str]:
    """(the CAT step mode `flow_cat_loss` runs, why): ``auto`` is fused (one row-planned call of 3B rows),
    except on an fp8 base (reference); a mode the flow objective lacks is refused."""
    if config.mode == "auto":
        if config.base_dtype == "fp8":
            return "reference", "auto: an fp8 base (the fused step's row-planned layers take full-precision weights)"
        return "fused", "auto: the fused flow CAT step (one row-planned call of 3B rows)"
    if config.mode not in flow_objective.MODES:
        modes = " or ".join(flow_objective.MODES)
        raise CatfastError(f"--mode {config.mode} is not built for DiT bases yet; use {modes}")
    return config.mode, "set by the config"


# ------------------------------------------------------------------------------------------------ the run


class _FlowRun:
    """One run between its steps: the transformer with its LoRA, optimizer, lr schedule, noise generator,
    data position and writers. ``freed``: (name, weak reference) of the encoders dropped before the loop."""

    def __init__(self, config: TrainConfig, dist: Dist, family: DenoiserFamily, dataset: FlowDataset, device,
                 identities, examples, mode: str, mode_reason: str, held: HeldPrompts):  # fmt: skip
        self.config, self.dist, self.family, self.dataset, self.held = config, dist, family, dataset, held
        self.device, self.identities, self.examples = device, identities, examples
        self.mode, self.mode_reason = mode, mode_reason
        self.out = Path(config.out)
        self.weight_dtype = DTYPES[config.mixed_precision]
        self.noise_gen = torch.Generator().manual_seed(config.seed)
        self.start_step, self.epoch, self.batch_index = 0, 0, 0
        self.metrics: MetricsWriter | None = None
        self.freed: list = []
        self.last: dict[str, float] = {}
        self.model = family.denoiser_type().from_pretrained(
            Path(config.base).expanduser(), subfolder=family.denoiser_key, local_files_only=True,
            torch_dtype=self.weight_dtype,
        )  # fmt: skip
        held.merge_kept(self.model)  # the teacher is base + kept adapters (before fp8 quantizes the weights)
        fp8 = config.base_dtype == "fp8"
        if not fp8:  # an fp8 base is quantized onto the device layer by layer: its full precision stays on the host
            self.model.to(device)
        seed_everything(config.seed)  # the LoRA's init does not depend on what loading drew
        add_lora(self.model, rank=config.rank, alpha=config.lora_alpha, target_modules=config.targets)
        if fp8:
            report = quantize_frozen_linears_(self.model, device=device)
            self.model.to(device)
            log.info("%s", report.line())
        self.params = {n: p for n, p in sorted(self.model.named_parameters()) if p.requires_grad}
        for p in self.params.values():  # half frozen transformer, fp32 LoRA (peft's cast_training_params)
            p.data = p.data.float()
        if config.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.trainable = list(self.params.values())
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            **({"fused": True} if device.type == "cuda" else {"foreach": True}),  # as the UNet trainer's
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.loss_kwargs = {"cat_weight": held.stripped_weight, "mode": mode}

    def restore(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint``: LoRA weights, optimizer, lr schedule, RNG, data position."""
        state = load_checkpoint(checkpoint)
        load_lora(self.params, state.lora, checkpoint)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng, self.noise_gen)
        self.start_step, self.epoch, self.batch_index = state.step, state.epoch, state.batch_index

    def loop(self, progress: bool) -> tuple[float, float | None]:
        """Steps start_step + 1 .. config.steps with their metrics and checkpoints; (total seconds, optimizer
        steps per second after the first step without checkpoint time, None for one step)."""
        config = self.config
        alive = [name for name, ref in self.freed if ref() is not None]
        log.info("CAT step mode %s: %s", self.mode, self.mode_reason)
        log.info("text encoders and VAE freed before the first step: %s (still referenced: %s)",
                 ", ".join(name for name, _ in self.freed) or "none loaded", ", ".join(alive) or "none")  # fmt: skip
        self.batches = BatchStream(self.dataset, config.batch_size * self.dist.world, config.seed, self.epoch,
                                   self.batch_index)  # fmt: skip
        bar = tqdm(total=config.steps, initial=self.start_step, desc="train", unit="step", disable=not progress)
        t_start, t_timed, timed, excluded = time.perf_counter(), None, 0, 0.0
        for step in range(self.start_step + 1, config.steps + 1):
            t0 = time.perf_counter()
            values, lr = self.step()
            self._record(step, values, lr, time.perf_counter() - t0, bar)
            if t_timed is None:
                t_timed = time.perf_counter()
            else:
                timed += 1
            t_extra = time.perf_counter()
            if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
                self.checkpoint(step)
            excluded += time.perf_counter() - t_extra
        bar.close()
        rate = timed / (time.perf_counter() - t_timed - excluded) if timed else None
        return time.perf_counter() - t_start, rate

    def step(self) -> tuple[list[float], float]:
        """One optimizer step of ``grad_accum`` micro-batches of the global batch (``batch_size`` x processes):
        the global batch's (loss, ldm, cat, keep, bank) and the lr it used."""
        config, family, dist = self.config, self.family, self.dist
        stats = torch.zeros(5, device=self.device)
        for _ in range(config.grad_accum):
            keys, start, n, count = self.batches.next_shard(dist)
            rows = slice(start, start + len(keys))
            dropped = self.held.dropped(n, rows, self.noise_gen)  # caption dropout (None when off)
            latents, cond, cond_stripped = self.dataset.batch(keys, self.device, self.weight_dtype, dropped)
            # noise and sigmas drawn for the whole global batch on every rank (one batch holds one bucket's
            # shape), this rank's rows taken: W processes compute what one process with the global batch does
            whole = latents[:1].expand(n, *latents.shape[1:])
            noise, sigmas = flow_objective.sample_flow_inputs(family, whole, generator=self.noise_gen)
            held = self.held.groups(self.dataset, n, rows, self.noise_gen, self.device, self.weight_dtype)
            bank = self.held.bank_rows(family, self.dataset, len(keys), self.noise_gen, self.device, self.weight_dtype)
            out = flow_objective.flow_cat_loss(family, self.model, latents, noise[rows], sigmas[rows], cond,
                                               cond_stripped, preserve=held, bank=bank, **self.loss_kwargs)  # fmt: skip
            # each rank's mean weighted by its share of the global batch: the ranks' gradients averaged below
            # are the global batch's mean (a rank left without samples computes one with weight 0)
            scale = count * dist.world / n / config.grad_accum
            (out.loss * scale).backward()
            stats += torch.stack([out.loss.detach(), out.ldm, *self.held.terms(out)]) * scale
        if dist.world > 1:
            _average_gradients(self.trainable, dist.world)
            torch.distributed.all_reduce(stats)
            stats /= dist.world
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats.tolist(), lr  # the one host sync per step

    def _record(self, step: int, values: list[float], lr: float, seconds: float, bar) -> None:
        """Refuse a non-finite loss, write the metrics line, move the progress bar (``log_step``)."""
        self.last = {"loss": values[0], "ldm": values[1], "cat": values[2]}
        if self.held.kept:
            self.last["keep"] = values[3]
        if self.held.bank is not None:
            self.last["bank"] = values[4]
        reason = self.mode_reason if step == self.start_step + 1 else None
        log_step(self.metrics, bar, step, self.last, lr=lr, seconds=seconds, mode=self.mode, reason=reason,
                 config_lr=self.config.lr)  # fmt: skip

    def checkpoint(self, step: int) -> None:
        """Save a checkpoint after ``step`` (its lora.safetensors inside, written before the folder lands), redraw
        loss.png."""
        config = self.config
        state = TrainState(
            step=step,
            epoch=self.batches.epoch,
            batch_index=self.batches.index,
            lora=self.params,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=None,
            rng=capture_rng(self.noise_gen),
            settings=run_settings(config, self.dist.world),
            config_hash=config.result_hash(),
            identities=self.identities,
            adapters={"lora.safetensors": (self.adapter(step), "diffusers")} if self.dist.main else {},
        )
        if self.dist.main:
            save_checkpoint(self.out / "checkpoints", state, keep=config.keep_checkpoints)
            self.metrics.plot(self.out / "loss.png")
        self.dist.barrier()  # no rank runs ahead of a checkpoint that may be resumed from

    def adapter(self, step: int) -> LoraAdapter:
        """The LoRA as of ``step`` (`dit_adapter`) with the run's triggers and captions in its metadata."""
        metadata = {
            "catfast.triggers": json.dumps([c.trigger for c in self.config.concepts]),
            "catfast.steps": str(step),
            "catfast.family": self.family.name,
            TRIGGER_PROMPTS: trigger_prompts_metadata([e.caption for e in self.examples]),
        }
        return dit_adapter(self.model, metadata)

    def finish(self, total: float, rate: float | None) -> TrainResult:
        """Write adapter.safetensors and the final loss.png (rank 0); the run's result."""
        path, adapters = self.out / ADAPTER, {}
        if self.dist.main:
            write_adapter(self.adapter(self.config.steps), path, "diffusers", overwrite=True)
            self.metrics.plot(self.out / "loss.png")
            self.metrics.close()
            adapters = {c.trigger: path for c in self.config.concepts}
        self.dist.barrier()
        return TrainResult(
            out=self.out,
            adapters=adapters,
            steps=self.config.steps,
            start_step=self.start_step,
            seconds=total,
            steps_per_second=rate,
            last=self.last,
            mode=self.mode,
            mode_reason=self.mode_reason,
            lora={name: p.detach().to("cpu", copy=True) for name, p in self.params.items()},
        )


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the LoRA gradients over the processes in one all-reduce (what DDP would do; the transformer is
    not wrapped in DDP, whose wrapper would hide the model's config from the family's ``predict`` and from the
    row-planned patch). A parameter without a gradient has none on every rank (the same graph): left out."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


# ------------------------------------------------------------------------------------------------ adapter


def dit_adapter(model: torch.nn.Module, metadata: dict[str, str]) -> LoraAdapter:
    """``model``'s LoRA (diffusers-format keys ``transformer.<module>.lora_A.weight`` when written; rank, alpha and
    targets in ``lora_adapter_metadata``, which ``load_lora_weights`` restores), plus ``metadata``."""
    adapter = extract_adapter(model)
    adapter.metadata.update(metadata)
    return adapter
