"""`catfast train`: the CAT training loop (its outputs are ``catfast.train.outputs``).

One run: load the base, scan the concept folders, cache VAE latents and text embeddings on disk, attach a
LoRA per concept (or one shared), then per optimizer step take ``grad_accum`` micro-batches of ``cat_loss``
in ``config.mode`` (``auto``: what ``auto_mode`` picks), with gradient clipping on the LoRA parameters,
AdamW, an lr schedule (``catfast.train.schedules``), mixed precision with loss scaling for fp16. Under
``torchrun`` (WORLD_SIZE > 1) every process takes its contiguous share of each global batch of ``batch_size
x world`` samples and the UNet is wrapped in DistributedDataParallel; noise and timesteps are drawn for the
whole global batch on every rank, so a run on W processes computes what one process with the global batch
computes. Only rank 0 writes.

Files in OUT: metrics.jsonl (one JSON object per step: step, loss, ldm, cat, lr, seconds — the step's
wall time), loss.png, samples/step-NNNNNNN.png (per prompt: base | adapter without the trigger |
adapter with the trigger), checkpoints/ (see `catfast.train.checkpoint`), config.json, and the adapter:
adapter.safetensors, or adapter-<trigger>.safetensors per concept with one adapter per concept.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catfast.folders import sigterm_as_interrupt
from catfast.integrations.models import resolve_base
from catfast.integrations.patch import fused_blocker, patch_report, patch_unet, unpatch_unet
from catfast.integrations.peft_adapters import check_targets
from catfast.rows import tensor_to_device
from catfast.train.batches import BatchStream, collate_batch
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
from catfast.train.dist import Dist, init_distributed
from catfast.train.graphs import GraphedSteps, check_graphable, flatten_conditions, unflatten_conditions
from catfast.train.mode_trial import ModeTrial
from catfast.train.objective import auto_mode, cat_loss
from catfast.train.outputs import (
    METRICS,
    MetricsWriter,
    SamplePlan,
    log_step,
    prepare_out,
    start_out,
    trained_adapters,
    truncate_metrics,
    write_adapters,
)
from catfast.train.recipes import dit_family
from catfast.train.retention import Retention
from catfast.train.run_parts import (
    DTYPES,
    TrainResult,
    device_for,
    load_lora,
    scan_examples,
    seed_everything,
)
from catfast.train.schedules import lr_lambda, sample_timesteps, timestep_probs
from catfast.train.unet_setup import _add_adapters, _build_dataset, _measures, empty_caption_row


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the adapter(s) ``config`` describes; see the module docstring (a diffusion transformer's pipeline
    folder as base: ``catfast.train.flow_trainer``). ``resume`` continues from the
    newest checkpoint in OUT/checkpoints (refused when its settings differ); ``overwrite`` starts over in
    an OUT that holds an earlier run's files. ``announce`` (rank 0) gets ``config.describe()``, what the run
    trains with, once every input check has passed and before the first step."""
    config.validate()
    dist = init_distributed()
    try:
        announce = announce if dist.main else None
        with sigterm_as_interrupt():  # SIGTERM ends the run like Ctrl-C: no partial checkpoint folder stays
            family = dit_family(config.base)
            if family is not None:  # a Flux / SD3 / Qwen-Image pipeline folder: the flow-matching trainer
                from catfast.train.flow_trainer import train_flow  # lazy: cost (only DiT bases need it)

                return train_flow(config, dist, family, resume=resume, overwrite=overwrite,
                                  progress=progress and dist.main, announce=announce)  # fmt: skip
            return _train(config, dist, resume=resume, overwrite=overwrite, progress=progress and dist.main,
                          announce=announce)  # fmt: skip
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(
    config: TrainConfig, dist: Dist, *, resume: bool, overwrite: bool, progress: bool, announce=None
) -> TrainResult:
    """The run: check OUT and the data, load and cache, then the step loop (``_Run``), then the adapter."""
    out = Path(config.out)
    resume_from, earlier = prepare_out(out, config, dist, resume=resume, overwrite=overwrite)
    if dist.main:
        remove_stale_partials(out / "checkpoints")  # what a SIGKILLed run left, named as it goes
    device = device_for(config, dist)
    seed_everything(config.seed)
    examples = scan_examples(config)  # bad data fails before any model work
    base = resolve_base(config.base, config=config.base_config, device=device)
    dataset = _build_dataset(base, examples, config, out, device, dist, progress)
    identities = content_identities(base, dataset.digests, [str(e.image) for e in dataset.examples])
    # --cat-prompts / --bank / --keep: inputs checked (and kept adapters merged) before OUT changes; None: off
    retention = Retention.prepare(config, base, device, DTYPES[config.mixed_precision])
    check_targets(base.unet, config.targets)  # a typo in --targets fails before OUT changes
    if resume_from is not None:
        check_identities(resume_from, identities)
    else:  # every input check passed: only now is an earlier run's output replaced and config.json written
        start_out(out, earlier, config, dist)
    if announce is not None:
        announce(config.describe())

    run = _Run(config, dist, base, dataset, device, identities, retention, examples)
    run.attach_adapters()
    if resume_from is not None:
        run.restore(resume_from)
    if dist.main:
        run.metrics = MetricsWriter(
            out / METRICS, truncate_metrics(out / METRICS, run.start_step) if resume_from else []
        )
        run.samples = SamplePlan(config, examples, run.names) if config.sample_every else None
    total, rate = run.loop(progress)
    return run.finish(total, rate)


class _Run:
    """The state of one training run between its steps: the UNet with its LoRA parameters, the optimizer,
    lr schedule and loss scaler, the noise generator, the data position, and rank 0's writers."""

    def __init__(
        self, config: TrainConfig, dist: Dist, base, dataset, device: torch.device, identities, retention, examples
    ):
        self.config, self.dist, self.base, self.dataset, self.device = config, dist, base, dataset, device
        self.identities, self.retention, self.examples = identities, retention, examples
        self.out = Path(config.out)
        self.weight_dtype = DTYPES[config.mixed_precision]
        self.noise_gen = torch.Generator().manual_seed(config.seed)
        self.timestep_probs = timestep_probs(config, base.scheduler)
        self.num_timesteps = base.scheduler.config.num_train_timesteps
        self.start_step, self.epoch, self.batch_index = 0, 0, 0
        self.empty_caption = empty_caption_row(base) if config.caption_dropout > 0 else None
        self.metrics: MetricsWriter | None = None
        self.samples: SamplePlan | None = None
        self.last: dict[str, float] = {}

    def attach_adapters(self) -> None:
        """LoRA adapter(s) on the UNet, the CAT step mode, patching (fused) or DDP, optimizer and schedules."""
        config, dist, unet = self.config, self.dist, self.base.unet
        self.names, self.params = _add_adapters(unet, config)
        if self.weight_dtype != torch.float32:  # half frozen UNet, fp32 LoRA weights (peft's cast_training_params)
            torch.nn.Module.to(unet, self.weight_dtype)  # not diffusers' .to, which warns about this very cast
            for p in self.params.values():
                p.data = p.data.float()
        self.mode, self.mode_reason = (config.mode, "set by the config")
        self.trial, self.announce_mode, self.graphed = None, False, None
        if config.cuda_graphs:  # before anything is built: a one-line refusal naming the setting
            check_graphable(config, self.device, dist.world, len(self.names))
        if config.mode == "auto":  # before checkpointing is on: the trainer patches the UNet once for fused
            self.mode, self.mode_reason = auto_mode(unet, self.device, per_sample_adapters=True)
        measures = _measures(config.mode, self.device, dist.world) and not config.cuda_graphs
        if measures and fused_blocker(unet, True) is None:
            self.trial = ModeTrial()
            self.mode, self.mode_reason = self.trial.next_mode(), "timing fused and reference over the first steps"
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if dist.main:
            logging.getLogger("catfast.train").info("CAT step mode %s: %s", self.mode, self.mode_reason)
        if self.mode == "fused":  # patched once: cat_loss would otherwise patch and unpatch every call
            patch_unet(unet, self.names)
        self.model = unet
        if dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                unet,
                device_ids=[dist.local_rank] if self.device.type == "cuda" else None,
                find_unused_parameters=len(self.names) > 1,  # a batch may hold no sample of some concept
                broadcast_buffers=False,
            )
        self.trainable = list(self.params.values())
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            # fused: one kernel for all LoRA tensors on CUDA. The dev CPU, 140 LoRA tensors: foreach 1.9 ms,
            # per tensor 3.2 ms, fused 440 ms per step
            **({"fused": True} if self.device.type == "cuda" else {"foreach": True}),
            **({"capturable": True} if config.cuda_graphs else {}),  # state updated in place on the GPU
        )
        if config.cuda_graphs:
            self.graphed = GraphedSteps(self._graph_body, functools.partial(self.optimizer.zero_grad, set_to_none=True))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        # each sample's adapter, by concept (all on the one adapter when it is shared); named explicitly,
        # since a patched UNet has no peft layers left for diffusers' active_adapters() to report
        self.adapter_of_concept = self.names if len(self.names) > 1 else self.names * len(config.concepts)

    def restore(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint``: LoRA weights, optimizer, schedules, scaler, RNG, data position."""
        state = load_checkpoint(checkpoint)
        load_lora(self.params, state.lora, checkpoint)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng, self.noise_gen)
        self.start_step, self.epoch, self.batch_index = state.step, state.epoch, state.batch_index

    def loop(self, progress: bool) -> tuple[float, float | None]:
        """Steps start_step + 1 .. config.steps with their metrics, checkpoints and samples. Returns the
        total seconds and the optimizer steps per second after the first step, without checkpoints and
        sampling (None for a one-step run)."""
        config = self.config
        self.batches = BatchStream(self.dataset, config.batch_size * self.dist.world, config.seed, self.epoch,
                                    self.batch_index)  # fmt: skip
        bar = None
        if progress:
            bar = tqdm(total=config.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)
        t_start = time.perf_counter()
        t_timed = None  # training time after the first step, without sampling and checkpoints
        timed_steps, excluded = 0, 0.0
        for step in range(self.start_step + 1, config.steps + 1):
            if self.trial is not None:
                self._use_mode(self.trial.next_mode())
            t0 = time.perf_counter()
            values, lr = self.step()  # its loss read back is the step's sync with the device
            seconds = time.perf_counter() - t0
            self._record(step, values, lr, seconds, bar)
            if self.trial is not None:
                self._end_trial_step(seconds)
            if t_timed is None:
                t_timed = time.perf_counter()
            else:
                timed_steps += 1
            t_extra = time.perf_counter()
            # the last step too: a later --resume with more --steps continues from it instead of redoing steps
            if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
                self.checkpoint(step)
            if self.samples is not None and (step % config.sample_every == 0 or step == config.steps):
                self.samples.run(self.base, self.out / "samples" / f"step-{step:07d}.png")
            excluded += time.perf_counter() - t_extra
        if bar is not None:
            bar.close()
        total = time.perf_counter() - t_start
        rate = timed_steps / (time.perf_counter() - t_timed - excluded) if timed_steps else None
        return total, rate

    def _use_mode(self, mode: str) -> None:
        """Run the next steps in ``mode``: the fused step on the patched UNet, the reference on the plain one."""
        unet = self.base.unet
        if mode == "fused" and patch_report(unet) is None:
            patch_unet(unet, self.names)
        elif mode == "reference" and patch_report(unet) is not None:
            unpatch_unet(unet)
        self.mode = mode

    def _end_trial_step(self, seconds: float) -> None:
        decided = self.trial.record(self.mode, seconds)
        if decided is not None:
            self.mode_reason, self.announce_mode = decided[1], True  # on the next step's metrics line
            self._use_mode(decided[0])
            logging.getLogger("catfast.train").info("CAT step mode %s: %s", *decided)
            self.trial = None

    def step(self) -> tuple[list[float], float]:
        """One optimizer step of ``grad_accum`` micro-batches; returns the global batch's (loss, ldm, cat,
        and with retention rows keep, bank) and the lr the step used."""
        config, dist = self.config, self.dist
        if self.graphed is not None:
            return self._graphed_step()
        retention = self.retention
        stats = torch.zeros(3 if retention is None else 5, device=self.device)
        for micro in range(config.grad_accum):
            inputs, adapters, count, n = self._micro_batch()
            sync = micro == config.grad_accum - 1 or dist.world == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss = self._loss(inputs, adapters)
                # DDP averages the ranks' gradients; weighting each rank's mean by its share of the
                # global batch makes that average the global batch's mean
                scale = count * dist.world / n / config.grad_accum
                self.scaler.scale(loss.total * scale).backward()
            terms = [loss.total, loss.ldm, loss.cat] + ([loss.keep, loss.bank] if retention is not None else [])
            stats += torch.stack([t.detach() for t in terms]) * scale
        if config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if dist.world > 1:  # the logged loss is the global batch's (each rank's share is weighted)
            torch.distributed.all_reduce(stats)
            stats /= dist.world
        return stats.tolist(), lr  # the one host sync per step: the metrics line and the progress bar need it

    def _micro_batch(self) -> tuple[dict, list[str], int, int]:
        """This rank's next micro-batch as ``cat_loss`` inputs (latents, noise, timesteps, cond, cond_stripped on
        the device), its samples' adapters, and (count, n) for weighting its loss in the global batch."""
        keys, start, n, count = self.batches.next_shard(self.dist)
        # drawn for the whole global batch on every rank: W processes compute what one would
        mine = slice(start, start + len(keys))
        drop = None
        if self.empty_caption is not None:  # caption dropout: which samples' diffusion term sees the empty caption
            drop = (torch.rand(n, generator=self.noise_gen) < self.config.caption_dropout)[mine].tolist()
        batch = collate_batch(self.dataset, keys, self.device, self.weight_dtype, empty=self.empty_caption, drop=drop)
        noise = torch.randn((n, *batch["latents"].shape[1:]), generator=self.noise_gen)[mine]
        timesteps = sample_timesteps(self.timestep_probs, n, self.noise_gen, self.num_timesteps)[mine]
        inputs = dict(latents=batch["latents"], noise=tensor_to_device(noise, self.device),
                      timesteps=tensor_to_device(timesteps, self.device),
                      cond=batch["cond"], cond_stripped=batch["cond_stripped"])  # fmt: skip
        return inputs, _adapters(self.adapter_of_concept, batch["concepts"]), count, n

    def _loss(self, inputs: dict, adapters: list[str]):
        """The step's loss on one micro-batch: the CAT loss, or the retention loss when retention rows are on."""
        config = self.config
        if self.retention is None:
            return cat_loss(self.model, self.base.scheduler, **inputs, mode=self.mode, adapters=adapters,
                            cat_weight=config.cat_weight, snr_gamma=config.snr_gamma)  # fmt: skip
        # the retention loss reads cat_weight and snr_gamma from the config
        return self.retention.loss(self.model, self.base.scheduler, **inputs, mode=self.mode, adapters=adapters,
                                   generator=self.noise_gen)  # fmt: skip

    def _graphed_step(self) -> tuple[list[float], float]:
        """``step`` as a replayed CUDA graph (``--cuda-graphs``; ``check_graphable`` refused what it cannot
        capture: one process, one micro-batch, no loss scaler, a constant lr, no retention rows)."""
        inputs, self._graph_adapters, _, _ = self._micro_batch()
        cond, cond_stripped = inputs.pop("cond"), inputs.pop("cond_stripped")
        inputs |= flatten_conditions(cond, "cond") | flatten_conditions(cond_stripped, "cond_stripped")
        stats = self.graphed.run(inputs)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()  # constant: nothing the captured step would miss
        return stats.tolist(), lr

    def _graph_body(self, flat: dict) -> torch.Tensor:
        """The captured step: CAT loss, backward, clipping, optimizer step; the loss terms as one tensor. The
        gradients are not zeroed after it: the captured backward writes them afresh on every replay."""
        inputs = {k: flat[k] for k in ("latents", "noise", "timesteps")}
        for name in ("cond", "cond_stripped"):
            inputs[name] = unflatten_conditions(flat, name)
        loss = self._loss(inputs, self._graph_adapters)
        loss.total.backward()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        return torch.stack([loss.total.detach(), loss.ldm.detach(), loss.cat.detach()])

    def _record(self, step: int, values: list[float], lr: float, seconds: float, bar) -> None:
        """Refuse a non-finite loss (outside fp16, whose scaler skips such steps), write the metrics line
        and move the progress bar (``log_step``)."""
        self.last = {"loss": values[0], "ldm": values[1], "cat": values[2]}
        if self.retention is not None:
            self.last.update(keep=values[3], bank=values[4])
        reason = None
        if step == self.start_step + 1 or self.announce_mode:  # why (config.mode "auto" decides per run)
            reason, self.announce_mode = self.mode_reason, False
        log_step(self.metrics, bar, step, self.last, lr=lr, seconds=seconds, mode=self.mode, reason=reason,
                 config_lr=self.config.lr, check_finite=self.config.mixed_precision != "fp16")  # fmt: skip

    def checkpoint(self, step: int) -> None:
        """Save a checkpoint after ``step`` (rank 0), redraw loss.png, and hold every rank until it is written."""
        config = self.config
        state = TrainState(
            step=step,
            epoch=self.batches.epoch,
            batch_index=self.batches.index,
            lora=self.params,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            rng=capture_rng(self.noise_gen),
            settings=run_settings(config, self.dist.world),
            config_hash=config.result_hash(),
            identities=self.identities,
            adapters={  # OUT's adapter file(s) as of this step: lora.safetensors (lora-<trigger>... per concept)
                "lora" + file.removeprefix("adapter"): (adapter, config.format)
                for file, (adapter, _) in trained_adapters(self.params, config, self.names, self.examples, step).items()
            }
            if self.dist.main
            else {},
        )
        if self.dist.main:
            save_checkpoint(self.out / "checkpoints", state, keep=config.keep_checkpoints)
            self.metrics.plot(self.out / "loss.png")
        self.dist.barrier()  # no rank runs ahead of a checkpoint that may be resumed from

    def finish(self, total: float, rate: float | None) -> TrainResult:
        """Unpatch, write the adapter file(s) and the final loss.png (rank 0), and the run's result."""
        files: dict[str, Path] = {}
        final = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
        if self.dist.main:
            if patch_report(self.base.unet) is not None:
                unpatch_unet(self.base.unet)
            files = write_adapters(self.params, self.config, self.names, self.out, self.examples)
            self.metrics.plot(self.out / "loss.png")
            self.metrics.close()
        self.dist.barrier()
        return TrainResult(
            out=self.out,
            adapters=files,
            steps=self.config.steps,
            start_step=self.start_step,
            seconds=total,
            steps_per_second=rate,
            last=self.last,
            mode=self.mode,
            mode_reason=self.mode_reason,
            lora=final,
        )


def _adapters(adapter_of_concept: list[str], concepts: torch.Tensor) -> list[str]:
    return [adapter_of_concept[c] for c in concepts.tolist()]
