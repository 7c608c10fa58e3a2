"""``Engine``: the serving engine's Python API (docs/serving-engine.md has the contract and the design).

One engine serves one base model: an adapter pool (``catfast.serve.pool``), a bounded queue and a
step-level scheduler (``catfast.serve.scheduler``) run by one background thread, and a loader thread
that reads adapter files for requests whose adapters are not in memory (so loads never block the
running batch).
"""

from __future__ import annotations

import logging
import queue as queue_module
import random
import threading
import time
from pathlib import Path

import torch

from catfast.demo.adapters import adapters_dir as shipped
from catfast.integrations.models import DEMO_DIT_BASE, BaseModel, base_location, load_base
from catfast.serve.errors import BadRequest, Cancelled, EngineFailure, NonFiniteOutput, ServeError
from catfast.serve.pool import AdapterInfo, AdapterPool
from catfast.serve.requests import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    Event,
    GenerationRequest,
    RequestHandle,
    check_adapter_name,
)
from catfast.serve.scan import SUFFIX, adapter_file, folder_entries, one_line
from catfast.serve.scheduler import Job, StepScheduler
from catfast.shipped import DIT_DEMO_SIDE, dit_adapters_path

log = logging.getLogger("catfast.serve")

MAX_STEPS = 150
MAX_N = 8


def default_adapters_dir(base, adapters_dir):
    """``adapters_dir``, or the shipped demo adapters when serving the shipped demo model without a folder
    (what ``catfast serve`` and the Ray deployment serve by default)."""
    if adapters_dir is None and base == "demo":
        return str(shipped())
    if adapters_dir is None and base == DEMO_DIT_BASE:
        return str(dit_adapters_path())
    return adapters_dir


def _load_base(base, device, dtype):

    if isinstance(base, BaseModel):
        model = base
    else:  # a diffusers folder, or "demo" (load_base resolves it)
        model = load_base(base, dtype=dtype or torch.float32, device=device)
    if model.text_encoder is None or model.vae is None:
        raise ServeError("serving needs the base model's text encoder and VAE")
    if getattr(model.unet, "peft_config", None):
        raise ServeError("the base UNet already carries peft adapters; serve a plain base and load adapters by name")
    for part in (model.unet, model.text_encoder, model.vae, model.text_encoder_2):
        if part is None:
            continue
        part.to(device=device, dtype=dtype) if dtype is not None else part.to(device)
        part.eval().requires_grad_(False)
    return model


class Engine:
    """A serving engine over one base model (see the module docstring and docs/serving-engine.md).

    base: "demo" (the shipped demo model), a diffusers folder, or a loaded ``BaseModel``.
    adapters_dir: every ``*.safetensors`` entry in it is registered by its stem at construction, under
    the rule ``POST /v1/adapters`` follows too (``catfast.serve.scan``: links that leave the folder,
    loops and non-files are refused); a file that fails is skipped with a one-line warning
    (``skipped`` lists them). Relative paths given to ``load_adapter`` resolve inside it by that rule.
    max_batch: images running at once; max_queue: requests waiting; max_resident: device slots;
    host_cache: parsed adapters kept in host memory; timeout_s: default per-request deadline;
    max_steps: the most denoising steps a request may ask for.
    """

    def __init__(
        self,
        base="demo",
        *,
        adapters_dir=None,
        device=None,
        dtype=None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_resident: int = 16,
        host_cache: int = 64,
        timeout_s: float = 300.0,
        max_steps: int = MAX_STEPS,
    ):
        if max_batch < 1 or max_queue < 1 or max_resident < 1 or max_steps < 1:
            raise ValueError("max_batch, max_queue, max_resident and max_steps must be >= 1")
        self.max_steps = int(max_steps)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from catfast.serve.dit import flow_family  # lazy: `catfast --help` imports this module's package

        demo_dit = base == DEMO_DIT_BASE
        if demo_dit:  # the shipped DiT demo base: its folder, checked against the manifest
            base = str(base_location(base))
        self.family = flow_family(base)  # a diffusion transformer's family (catfast.serve.dit), None for a UNet
        self.device = device
        self.timeout_s = float(timeout_s)
        self.adapters_dir = None if adapters_dir is None else Path(adapters_dir).resolve()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._loads: queue_module.Queue = queue_module.Queue()
        limits = dict(max_batch=max_batch, max_queue=max_queue, request_load=self._loads.put)
        if self.family is None:
            self.base = _load_base(base, device, dtype)
            self.unet = self.base.unet
            encoders = {"text_encoder": self.base.text_encoder, "text_encoder_2": self.base.text_encoder_2}
            self.pool = AdapterPool(self.unet, num_slots=max_resident, host_cache=host_cache, text_encoders=encoders)
            self.scheduler = StepScheduler(self.base, self.pool, **limits)
            factor = self.base.vae_scale_factor
            self.native_size = int(self.unet.config.sample_size * factor)
            # the UNet halves the latent len(down blocks) - 1 times
            self._multiple = factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
            self._why_multiple = ""
        else:  # a diffusion transformer: whole-batch runs of the flow sampler (catfast.serve.dit)
            from catfast.serve.dit import DitAdapterPool, DitScheduler, load_pipeline  # lazy: UNet servers skip it

            self.base = load_pipeline(base, self.family, device, dtype)
            self.unet = self.base.transformer  # the denoiser (named as the UNet's for the pool and benches)
            self.pool = DitAdapterPool(self.unet, self.family, num_slots=max_resident, host_cache=host_cache)
            self.scheduler = DitScheduler(self.base, self.pool, self.family, **limits)
            factor = self.base.vae_scale_factor
            # a FluxPipeline folder records no size: the pipeline's default (512 px), the DiT demo's 32
            self.native_size = DIT_DEMO_SIDE if demo_dit else int(self.base.default_sample_size * factor)
            self._multiple = factor * 2
            self._why_multiple = f": the VAE's factor {factor} x the {self.family.name} transformer's 2x2 patches"
        self._ids = 0
        self._thread: threading.Thread | None = None
        self._loader: threading.Thread | None = None
        self._stop = False
        self._closed = False
        self._rng = random.SystemRandom()
        self.max_n = min(MAX_N, max_batch)
        self.skipped: list[tuple[str, str]] = []  # (file, why) of the start-up scan
        if self.adapters_dir is not None:
            if not self.adapters_dir.is_dir():
                raise ServeError(f"{adapters_dir}: the adapters folder does not exist")
            self._scan()

    def _scan(self) -> None:
        """Register every ``*.safetensors`` entry of the adapters folder by its stem, under the rule
        ``POST /v1/adapters`` follows (``catfast.serve.scan``); skip what fails with one warning line."""
        for entry in folder_entries(self.adapters_dir):
            try:
                self.load_adapter(entry[: -len(SUFFIX)], adapter_file(self.adapters_dir, entry))
            except ServeError as e:
                why = one_line(e)
                self.skipped.append((entry, why))
                log.warning("skipping adapter %s: %s", self.adapters_dir / entry, why)

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        """Start the step loop and the loader (idempotent); returns the engine."""
        with self._lock:
            if self._closed:
                raise ServeError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="catfast-serve-steps", daemon=True)
                self._loader = threading.Thread(target=self._load_loop, name="catfast-serve-loader", daemon=True)
                self._thread.start()
                self._loader.start()
        return self

    def close(self) -> None:
        """Stop the threads; queued and running requests fail with Cancelled. The UNet loses its hooks."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._stop = True
            self._cond.notify_all()
        self._loads.put(None)
        for thread in (self._thread, self._loader):
            if thread is not None:
                thread.join(timeout=60)
        with self._lock:
            self.scheduler.fail_all(lambda job: Cancelled(f"request {job.handle.id}: the engine was closed"))
            self.pool.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ adapters

    def _resolve_path(self, name: str, path) -> Path:
        if path is None:
            if self.adapters_dir is None:
                raise BadRequest(f"no path given for adapter {name!r} and the engine has no adapters folder")
            return self.adapters_dir / f"{name}.safetensors"
        path = Path(path)
        if path.is_absolute() or self.adapters_dir is None:
            return path
        return adapter_file(self.adapters_dir, str(path))  # the rule of the start-up scan and POST /v1/adapters

    def load_adapter(self, name: str, path=None) -> AdapterInfo:
        """Register adapter ``name`` from ``path`` (a .safetensors file in peft/diffusers or kohya format,
        LoCon included; relative paths resolve in ``adapters_dir``, None = ``adapters_dir/name.safetensors``).
        The file is read and checked now (AdapterLoadError: nothing else changes); it becomes resident on
        the device when a request needs it. Re-registering a name replaces it for new requests."""
        check_adapter_name(name)
        path = self._resolve_path(name, path)
        layers, meta = self.pool.read_file(path)  # outside the lock: running requests go on
        with self._lock:
            return self.pool.register(name, str(path), layers, meta)

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` (UnknownAdapter if missing). New requests cannot use it; requests already
        queued or running with it finish, and its slot is freed when the last one ends."""
        with self._lock:
            self.pool.unregister(name)

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return self.pool.infos()

    # ------------------------------------------------------------------------------------ requests

    @property
    def defaults(self) -> dict:
        """Defaults and limits for validation and UIs."""
        top = max(self.native_size * 2, self._multiple)
        sizes = [s for s in range(self._multiple, top + 1, self._multiple)]
        return {
            "steps": min(20, self.max_steps),
            "guidance": 5.0,
            "max_steps": self.max_steps,
            "max_guidance": MAX_GUIDANCE,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_n": self.max_n,
            "sizes": sizes,
            "schedulers": list(self.scheduler.samplers),
            "scheduler": self.scheduler.samplers[0],
        }

    def _size(self, size) -> tuple[int, int]:
        if size is None:
            return self.native_size, self.native_size
        top = max(self.native_size * 2, self._multiple)
        for side in size:
            if side % self._multiple or not self._multiple <= side <= top:
                raise BadRequest(
                    f"size {size[0]}x{size[1]}: each side must be a multiple of {self._multiple}{self._why_multiple}, "
                    f"between {self._multiple} and {top} (the model's native size is {self.native_size})"
                )
        return size

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request`` (starting the engine if needed); returns at once. Raises BadRequest,
        UnknownAdapter or QueueFull without queueing anything."""
        if not isinstance(request, GenerationRequest):
            raise BadRequest(f"submit takes a GenerationRequest, got {type(request).__name__}")
        if request.steps is None:
            request.steps = self.defaults["steps"]
        if request.scheduler is None:
            request.scheduler = self.scheduler.samplers[0]
        self.scheduler.check(request)  # what this kind of base cannot run (a DiT: a sampler other than euler)
        if request.steps > self.max_steps:
            raise BadRequest(f"steps must be at most {self.max_steps}, got {request.steps}")
        if request.n > self.max_n:
            raise BadRequest(f"n must be at most {self.max_n}, got {request.n}")
        if len(request.adapters) > self.pool.num_slots:
            raise BadRequest(
                f"the request names {len(request.adapters)} adapters but the engine holds at most "
                f"{self.pool.num_slots} on the device (max_resident)"
            )
        size = self._size(request.size)
        timeout = request.timeout_s if request.timeout_s is not None else self.timeout_s
        seed = request.seed if request.seed is not None else self._rng.randrange(2**31)
        self.start()
        with self._cond:
            if self._closed:
                raise ServeError("the engine is closed")
            entries = [(self.pool.lookup(name), w) for name, w in request.adapters.items()]
            self._ids += 1
            handle = RequestHandle(request, self._ids)
            handle.seed = seed
            job = Job(handle, request, size, entries, seed, time.monotonic() + timeout, self._ids)
            self.scheduler.enqueue(job)
            self._cond.notify_all()
        return handle

    def generate(
        self,
        prompt: str,
        *,
        adapters: dict[str, float] | None = None,
        n: int = 1,
        size=None,
        steps: int = 20,
        guidance: float = 5.0,
        seed: int | None = None,
        negative_prompt: str = "",
        timeout_s: float | None = None,
        scheduler: str | None = None,
    ) -> list:
        """Submit and wait: the ``n`` PIL images of one request."""
        request = GenerationRequest(
            prompt,
            adapters=adapters or {},
            n=n,
            size=size,
            steps=steps,
            guidance=guidance,
            seed=seed,
            negative_prompt=negative_prompt,
            timeout_s=timeout_s,
            scheduler=scheduler,
        )
        handle = self.submit(request)
        limit = request.timeout_s if request.timeout_s is not None else self.timeout_s
        try:
            return handle.result(timeout=limit + 60.0)
        except BaseException:
            handle.cancel()
            raise

    def stats(self) -> dict:
        with self._lock:
            s, p = self.scheduler, self.pool
            return {
                "queue_depth": len(s.queue),
                "running": len(s.running),
                "batch_size": s.last_batch,
                "step_latency_s": s.last_step_s,
                "adapter_hits": p.hits,
                "adapter_loads": p.loads,
                "adapter_evictions": p.evictions,
                "resident": p.resident(),
                "registered": len(p.entries),
            }

    # ------------------------------------------------------------------------------------ threads

    def _run(self) -> None:
        sched = self.scheduler
        while True:
            with self._cond:
                while not self._stop and not sched.has_work():
                    self._cond.wait(0.5)
                if self._stop:
                    return
                admitted, batch = sched.prepare()
            for job in admitted:
                try:
                    sched.start(job)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
                    log.exception("request %s failed to start", job.handle.id)
                    with self._lock:
                        sched.drop(job, _failure("while encoding the prompts", e))
            with self._lock:
                batch = [j for j in batch if j.started and j in sched.running]
            if not batch:
                with self._cond:
                    if not self._stop and not sched.running:
                        self._cond.wait(0.05)  # waiting for a load or a free slot
                continue
            try:
                done = sched.step(batch)
            except Exception as e:  # noqa: BLE001
                log.exception("a step failed")
                with self._lock:
                    for job in batch:
                        sched.drop(job, _failure("in a denoising step", e))
                continue
            for job in batch:
                job.handle.emit(_progress(job))
            for job in done:
                try:
                    images = sched.decode(job)
                except NonFiniteOutput as e:
                    with self._lock:
                        sched.drop(job, e)
                    continue
                except Exception as e:  # noqa: BLE001
                    log.exception("decoding request %s failed", job.handle.id)
                    with self._lock:
                        sched.drop(job, _failure("while decoding the latents", e))
                    continue
                with self._lock:
                    sched.drop(job, None)
                job.handle.latents = job.latents
                job.handle.emit(Event("done", job.step, len(job.timesteps), images=images))

    def _load_loop(self) -> None:
        while True:
            entry = self._loads.get()
            if entry is None:
                return
            try:
                layers, _ = self.pool.read_file(entry.path)
                error = None
            except Exception as e:  # noqa: BLE001 - read_file reports files as ServeErrors; anything else must not end this thread
                layers, error = None, one_line(e)
            with self._cond:
                entry.loading = False
                if layers is not None:
                    self.pool.keep_on_host(entry, layers)
                else:
                    entry.error = error
                self._cond.notify_all()


def _progress(job: Job) -> Event:
    return Event("progress", job.step, len(job.timesteps))


def _failure(stage: str, e: BaseException) -> EngineFailure:
    """The error a request gets when the engine itself failed ``stage`` (HTTP 500)."""
    return EngineFailure(
        one_line(f"the engine failed {stage} ({type(e).__name__}: {e}); this is not a problem with the request")
    )
