"""The step-level scheduler: requests join and leave the running batch at denoising-step boundaries.

Each request (``Job``) carries its own diffusers scheduler instance (DDIM, Euler or DPM++ 2M; steps),
guidance, seed, size and adapter mix.
Every loop iteration: drop cancelled and timed-out requests, install adapters that finished loading,
admit queued requests (up to ``max_batch`` images running), then run ONE denoising step for the running
requests of one size bucket (the oldest request's; only same-size requests share a UNet call), as one
UNet call whose rows are grouped by adapter mix (``SegmentPlan``).

Admission order (no request starves): requests start in order of arrival. A request that does not fit
the free batch room, or whose adapters cannot get a device slot (every slot holds an adapter that a
running request uses), stops admission: nothing behind it starts until it has started. The one
exception is a request whose adapter file is still being read from disk (on the loader thread): later
requests may start meanwhile, and it starts first once the read is done. Before, a request that could
not get a device slot was skipped, and requests behind it whose adapters were resident kept those slots
busy: it could wait until its timeout. ``admissions`` records each start (request id, size, wait).

Row layout of a step: requests sorted by adapter mix (base first); a request with n images and CFG
has rows [uncond x n | cond x n], without CFG (guidance <= 1) [cond x n]. A request's rows get its
own timestep, text condition and adapters, so its result does not depend on what shares the call
(up to the float rounding of batched GEMMs: within 1e-3 on the CPU in fp32, tested).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from catfast.eval.sampler import decode_latents, nonfinite_rows
from catfast.integrations.models import encode_prompt
from catfast.integrations.row_call import run_segmented
from catfast.integrations.schedulers import sampling_scheduler
from catfast.ops.segmented import Segment, SegmentPlan
from catfast.serve.errors import AdapterLoadError, Cancelled, NonFiniteOutput, QueueFull, RequestTimeout, ServeError
from catfast.serve.pool import AdapterPool, Entry
from catfast.serve.requests import SCHEDULERS, Event, GenerationRequest, RequestHandle


@dataclass
class Job:
    """A request inside the engine."""

    handle: RequestHandle
    request: GenerationRequest
    size: tuple[int, int]  # (width, height) in pixels
    entries: list[tuple[Entry, float]]
    seed: int
    deadline: float
    order: int
    step: int = 0
    latents: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    scheduler: object = None
    hidden: torch.Tensor | None = None  # [rows, L, D]: uncond rows then cond rows (cond only without CFG)
    added: dict | None = None  # SDXL: {"text_embeds": [rows, P], "time_ids": [rows, 6]}, same row order
    started: bool = False
    pinned: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def cfg(self) -> bool:
        return self.request.guidance > 1.0  # diffusers' do_classifier_free_guidance

    @property
    def rows(self) -> int:
        return self.request.n * (2 if self.cfg else 1)

    def mix(self) -> tuple[tuple[int, float], ...]:
        """(slot, weight) pairs of its adapters (resident), by slot; () for the base model. Weight-0
        adapters add nothing and are left out (their rows skip the LoRA work)."""
        return tuple(sorted((e.slot, w) for e, w in self.entries if w != 0.0))


class StepScheduler:
    """Queue, running set and the step itself. The engine calls ``prepare`` under its lock, then ``start``
    and ``step`` outside it, then ``finish`` under it. ``catfast.serve.dit.DitScheduler`` keeps the queue,
    admission and adapter pinning and replaces what runs (``check``, ``batch_key``, ``start``, ``step``,
    ``decode``)."""

    samplers: tuple[str, ...] = tuple(SCHEDULERS)  # the request schedulers it runs; the first is the default

    def __init__(self, base, pool: AdapterPool, *, max_batch: int, max_queue: int, request_load):
        self.base, self.pool = base, pool
        self.max_batch, self.max_queue = max_batch, max_queue
        self.request_load = request_load  # callback: read an adapter file into the host tier (async)
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.last_batch = 0
        self.last_step_s = 0.0
        # (request id, (width, height), seconds from submission to start) of the latest starts
        self.admissions: deque[tuple[int, tuple[int, int], float]] = deque(maxlen=10_000)

    # ---------------------------------------------------------------- under the engine lock

    def enqueue(self, job: Job) -> None:
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        for entry, _ in job.entries:
            entry.queued += 1
        self.queue.append(job)
        job.handle.emit(Event("queued", 0, job.request.steps))

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    def prepare(self) -> tuple[list[Job], list[Job]]:
        """Housekeeping and admission; returns (newly admitted jobs, the jobs of the next step)."""
        now = time.monotonic()
        for job in list(self.queue):
            error = self._stop_reason(job, now)
            if error is None:
                for entry, _ in job.entries:
                    if entry.error is not None and entry.slot is None and entry.layers is None:
                        error = AdapterLoadError(f"adapter {entry.name!r} could not be loaded: {entry.error}")
            if error is not None:
                self.queue.remove(job)
                self._release(job, running=False)
                job.handle.fail(error)
        for job in list(self.running):
            error = self._stop_reason(job, now)
            if error is not None:
                self.drop(job, error)
        admitted = self._admit()
        if not self.running:
            return admitted, []
        key = self.batch_key(min(self.running, key=lambda j: j.order))
        batch = [j for j in self.running if self.batch_key(j) == key]
        return admitted, batch

    def check(self, request: GenerationRequest) -> None:
        """Refuse (BadRequest) what this scheduler cannot run; a UNet step runs every valid request."""

    def batch_key(self, job: Job):
        """Jobs with equal keys can share a denoising call: the same image size."""
        return job.size

    def _stop_reason(self, job: Job, now: float) -> ServeError | None:
        if job.handle.cancel_requested:
            return Cancelled(f"request {job.handle.id} was cancelled")
        if now > job.deadline:
            return RequestTimeout(f"request {job.handle.id} did not finish within its timeout")
        return None

    def _admit(self) -> list[Job]:
        admitted = []
        busy = sum(j.request.n for j in self.running)
        for job in list(self.queue):
            if self.running and busy + job.request.n > self.max_batch:
                break  # in order: a later, smaller request does not overtake
            missing = [e for e, _ in job.entries if e.slot is None and e.layers is None]
            if missing:
                for entry in missing:
                    if not entry.loading and entry.error is None:
                        entry.loading = True
                        self.request_load(entry)
                continue  # its file is being read: later requests may go first meanwhile
            if not self._pin(job):
                break  # every slot holds an adapter a running request uses: wait for one, in order
            self.queue.remove(job)
            self.running.append(job)
            busy += job.request.n
            admitted.append(job)
            job.handle.started_at = time.monotonic()
            self.admissions.append((job.order, job.size, job.handle.started_at - job.handle.submitted_at))
        return admitted

    def _pin(self, job: Job) -> bool:
        """Install the job's adapters and mark them used by a running request (never evicted under it)."""
        pinned = []
        for entry, _ in job.entries:
            if not self.pool.install(entry):
                for e in pinned:
                    e.running -= 1
                return False
            entry.running += 1
            pinned.append(entry)
        for entry in pinned:
            entry.queued -= 1
            self.pool.touch(entry)
        job.pinned = True
        return True

    def _release(self, job: Job, running: bool) -> None:
        for entry, _ in job.entries:
            if running:
                entry.running -= 1
            else:
                entry.queued -= 1
            self.pool.release_if_unused(entry)

    def drop(self, job: Job, error: BaseException | None) -> None:
        """Remove a running job (finished when ``error`` is None)."""
        if job in self.running:
            self.running.remove(job)
            self._release(job, running=True)
        if error is not None:
            job.handle.fail(error)

    def fail_all(self, error_for) -> None:
        for job in list(self.queue):
            self.queue.remove(job)
            self._release(job, running=False)
            job.handle.fail(error_for(job))
        for job in list(self.running):
            self.drop(job, error_for(job))

    # ---------------------------------------------------------------- outside the lock (scheduler thread)

    @torch.no_grad()
    def start(self, job: Job) -> None:
        """Encode the prompts, draw the initial noise and set up the job's own diffusers scheduler."""
        base, unet = self.base, self.base.unet
        device, dtype = unet.device, unet.dtype
        req = job.request
        factor = base.vae_scale_factor
        width, height = job.size
        from catfast.integrations.word_embedding import request_embeddings

        with self._text_encoder_plan(job.mix()), request_embeddings(base, job.entries):
            self._encode(job, base, req, (height, width), device, dtype)
        shape = (req.n, unet.config.in_channels, height // factor, width // factor)
        # diffusers' prepare_latents with one CPU generator: what the pipeline draws for
        # num_images_per_prompt=n and generator=torch.Generator().manual_seed(seed)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(job.seed), dtype=dtype).to(device)
        scheduler = sampling_scheduler(SCHEDULERS[req.scheduler], base.scheduler.config)
        scheduler.set_timesteps(req.steps, device=device)
        job.latents = latents * scheduler.init_noise_sigma
        job.scheduler, job.timesteps = scheduler, scheduler.timesteps
        job.started = True

    @contextlib.contextmanager
    def _text_encoder_plan(self, mix):
        """The request's adapters on the text encoders' rows (one prompt at a time) while it is encoded."""
        holders = [h for c, h in self.pool.holders.items() if c != "unet"]
        if mix:
            for holder in holders:
                holder.plan = SegmentPlan(1, [Segment(0, 1, mix)], device=self.base.text_encoder.device)
        try:
            yield
        finally:
            for holder in holders:
                holder.plan = None

    @staticmethod
    def _encode(job: Job, base, req, size, device, dtype) -> None:

        if base.is_sdxl:
            job.hidden, job.added = _sdxl_conditions(base, req, size, job.cfg, device, dtype)
        else:
            cond = encode_prompt(base, [req.prompt]).to(device, dtype)
            hidden = cond.expand(req.n, -1, -1)
            if job.cfg:
                uncond = encode_prompt(base, [req.negative_prompt]).to(device, dtype)
                hidden = torch.cat([uncond.expand(req.n, -1, -1), hidden])
            job.hidden = hidden.contiguous()

    @torch.no_grad()
    def step(self, jobs: list[Job]) -> list[Job]:
        """One denoising step of every job in ``jobs`` (same size) as one UNet call; returns the jobs that
        took their last step."""

        jobs = sorted(jobs, key=lambda j: (j.mix(), j.order))
        unet = self.base.unet
        xs, ts, hs, starts = [], [], [], []
        groups: dict[tuple, list[int]] = {}
        row = 0
        for job in jobs:
            t = job.timesteps[job.step]
            x = job.latents if not job.cfg else torch.cat([job.latents, job.latents])
            x = job.scheduler.scale_model_input(x, t)
            xs.append(x)
            ts.append(t.reshape(1).expand(job.rows))
            hs.append(job.hidden)
            starts.append(row)
            groups.setdefault(job.mix(), []).append(len(starts) - 1)
            row += job.rows
        plan = self._plan(jobs, starts, groups, row)
        extra = {}
        if jobs[0].added is not None:
            extra["added_cond_kwargs"] = {k: torch.cat([j.added[k] for j in jobs]) for k in jobs[0].added}
        tic = time.perf_counter()
        out = run_segmented(
            unet, self.pool.holder, plan, torch.cat(xs), torch.cat(ts), encoder_hidden_states=torch.cat(hs), **extra
        )
        done = []
        for job, start in zip(jobs, starts):
            n = job.request.n
            pred = out[start : start + n]
            if job.cfg:
                pred = pred + job.request.guidance * (out[start + n : start + 2 * n] - pred)
            t = job.timesteps[job.step]
            extra = {"eta": 0.0} if job.request.scheduler == "ddim" else {}
            job.latents = job.scheduler.step(pred, t, job.latents, return_dict=False, **extra)[0]
            job.step += 1
            if job.step >= len(job.timesteps):
                done.append(job)
        self.last_step_s = time.perf_counter() - tic
        self.last_batch = sum(j.request.n for j in jobs)
        for job in jobs:  # how many requests shared its largest call (for tests and stats)
            job.handle.peak_batch = max(job.handle.peak_batch, len(jobs))
        return done

    def _plan(self, jobs, starts, groups, rows) -> SegmentPlan:
        """Segments per adapter mix when they come out equal in length (one batched matmul pair per
        layer), else per request when those are equal, else per mix."""
        by_mix = []
        for mix, members in groups.items():
            if mix:
                first, last = members[0], members[-1]
                by_mix.append(Segment(starts[first], starts[last] + jobs[last].rows, mix))
        per_job = [Segment(s, s + j.rows, j.mix()) for j, s in zip(jobs, starts) if j.mix()]
        device = self.base.unet.device
        plan = SegmentPlan(rows, by_mix, device=device)
        if plan.uniform or not by_mix:
            return plan
        alt = SegmentPlan(rows, per_job, device=device)
        return alt if alt.uniform else plan

    @torch.no_grad()
    def decode(self, job: Job) -> list:
        """The job's pictures; NonFiniteOutput, naming the likely cause, when its final latents hold NaN
        or Inf (they would decode to black pictures)."""
        bad = nonfinite_rows(job.latents)
        if bad:
            raise nonfinite_error(job, f"{len(bad)} of {job.request.n} images")
        return decode_latents(self.base, job.latents)


def nonfinite_error(job: Job, which: str) -> NonFiniteOutput:
    """The error of a request whose final latents (``which``: "2 of 4 images") hold NaN or Inf, naming the
    likely causes."""
    req = job.request
    causes = [f"guidance_scale {req.guidance:g}"] if job.cfg else []
    causes += [f"adapter {e.name!r} at weight {w:g}" for e, w in job.entries if w != 0.0]
    return NonFiniteOutput(
        f"request {job.handle.id}: {which} came out NaN/Inf (no picture to send). "
        f"Likely cause: {', or '.join(causes) or 'the base model'}; lower the guidance or the adapter "
        "weights, or check the adapter file"
    )


def _sdxl_conditions(base, req, size: tuple[int, int], cfg: bool, device, dtype) -> tuple[torch.Tensor, dict]:
    """SDXL rows' text conditions as diffusers' StableDiffusionXLPipeline builds them: with CFG and no
    negative prompt, zeros for the uncond rows (force_zeros_for_empty_prompt); time ids
    (h, w, 0, 0, h, w) for the image size."""

    n = req.n

    def rows(prompt: str):
        cond = encode_prompt(base, [prompt], image_size=size)
        added = cond["added_cond_kwargs"]
        hidden = cond["encoder_hidden_states"].to(device, dtype).expand(n, -1, -1)
        text, time_ids = (added[k].to(device, dtype).expand(n, -1) for k in ("text_embeds", "time_ids"))
        return hidden, text, time_ids

    hidden, text, time_ids = rows(req.prompt)
    if cfg:
        if req.negative_prompt:
            u_hidden, u_text, _ = rows(req.negative_prompt)
        else:
            u_hidden, u_text = torch.zeros_like(hidden), torch.zeros_like(text)
        hidden, text, time_ids = torch.cat([u_hidden, hidden]), torch.cat([u_text, text]), torch.cat([time_ids] * 2)
    return hidden.contiguous(), {"text_embeds": text.contiguous(), "time_ids": time_ids.contiguous()}
