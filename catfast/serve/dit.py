"""Serving a diffusion transformer: ``catfast serve --base <pipeline folder>`` of FLUX.1, SD3/3.5 or Qwen-Image
(the flow families of ``catfast.integrations.families``).

Shared with UNet serving: the engine (``catfast.serve.engine``), the HTTP API, request validation, the
bounded queue, admission in order, adapter pinning, and the disk -> host -> device tiers of the pool.
What differs, here:

- the run (``DitScheduler``): a batch runs all its denoising steps as one call of the batched flow sampler
  (``catfast.eval.flow_sampler.sample_flow_latents``): each Euler step is ONE transformer call over the
  rows of every request in the batch, whatever adapter each uses, and each row equals the family's
  diffusers pipeline run for it alone. Requests share a batch when they agree on size, steps, guidance
  and negative prompt (``batch_key``), whatever their adapters and weights; others wait for the next batch.
  Unlike a UNet
  server, a request that arrives while a batch runs does not join it at a step boundary, and a
  cancellation or a timeout takes effect between batches.
- the adapters (``DitAdapterPool``): a resident adapter is a peft adapter attached to the transformer
  (``integrations.peft_adapters.attach_adapter``), one per device slot; the sampler's row plan picks each
  row's, so switching adapters re-attaches nothing. Row-planned peft layers need every attached adapter
  on the same modules, so an adapter is attached padded with rank-1 zero layers (an exactly-zero update)
  on the modules the others target; one that targets a module no resident adapter does makes the pool
  attach the resident ones again once, with the wider padding. The transformer stays patched for row plans
  between batches (``DitAdapterPool.ready``): a request for another resident adapter changes only the plan;
  attaching or detaching an adapter undoes the patch first (peft edits its own layers), and the next batch
  builds it again for the new set of adapters.
- weights and stacks: each row has its own LoRA scale, so requests at different weights share a batch. The row
  plan gives a row one adapter, so a request stacking several (``a:0.8+b``) gets one composite peft adapter:
  the parts' LoRA factors side by side with their weights folded in (``adapters.merge.stack_layers``, exact,
  rank = the summed ranks), attached once per mix and kept for the next request with the same mix
  (``STACK_CACHE`` mixes, LRU, more while one batch needs them; dropped when a part leaves the device or the
  padding widens).
- image k of a request with seed s is the pipeline's image for seed s + k (each row's noise comes from
  its own generator, as the pipeline draws it for one image).
- an adapter file of another family (a UNet LoRA, or a transformer LoRA whose module names say another
  family) is refused when registered: ``AdapterFamilyError``, HTTP 400 naming both.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch

from catfast.adapters.adapter import LoraAdapter, LoraLayer, guess_family, layer_key
from catfast.adapters.formats import read_adapter
from catfast.adapters.merge import resolve_targets, stack_layers
from catfast.errors import ModelLoadError
from catfast.eval.flow_sampler import sample_flow_latents
from catfast.eval.sampler import NonFiniteLatents
from catfast.integrations.families import family_of
from catfast.integrations.models import quiet_progress_bars
from catfast.integrations.patch import patch_report, patch_unet, trust_adapter_weights, unpatch_unet
from catfast.integrations.peft_adapters import attach_adapter, extract_adapter
from catfast.serve.errors import AdapterFamilyError, AdapterLoadError, BadRequest, ServeError
from catfast.serve.pool import AdapterPool, Entry, adapter_meta
from catfast.serve.requests import GenerationRequest
from catfast.serve.scan import one_line
from catfast.serve.scheduler import Job, StepScheduler, nonfinite_error

COMPONENT = "transformer"
STACK_CACHE = 8  # composite adapters of stacked requests kept attached (each costs its summed rank)


def flow_family(base):
    """The flow family of ``base`` when it is a diffusers pipeline folder of a diffusion transformer, else
    None (a UNet folder, a single file, "demo", a loaded model, or a folder no family knows: the UNet loader
    reports those)."""
    if not isinstance(base, (str, os.PathLike)) or not (Path(base) / "model_index.json").is_file():
        return None
    try:
        family = family_of(base)
    except ModelLoadError:
        return None
    return None if family.denoiser_key != COMPONENT else family


def load_pipeline(folder, family, device: torch.device, dtype):
    """The family's diffusers pipeline from ``folder`` on ``device`` in ``dtype`` (default float32), frozen."""
    quiet_progress_bars()
    try:
        pipe = family.pipeline_type().from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001 - a broken folder is one line at start-up, whatever diffusers raised
        raise ServeError(
            one_line(f"{folder}: cannot load the {family.name} pipeline: {type(e).__name__}: {e}")
        ) from None
    if getattr(pipe.transformer, "peft_config", None):
        raise ServeError("the base transformer already carries peft adapters; serve a plain base")
    pipe.to(device)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kind(family: str) -> str:
    return "a UNet (SD 1.x / 2.x / SDXL)" if family == "unet" else f"a {family} transformer"


class _Modules:
    """The transformer's modules as loaded, before any peft layer: what registration checks files against
    (``resolve_targets`` reads ``named_modules``) without walking the live model, which the step thread
    changes when it attaches adapters."""

    def __init__(self, model: torch.nn.Module):
        self.named = dict(model.named_modules())

    def named_modules(self):
        return iter(self.named.items())


def _zero_layer(module: torch.nn.Module) -> LoraLayer:
    """A rank-1 LoRA layer of ``module`` whose update is exactly zero (B = 0)."""
    w = module.weight
    return LoraLayer(torch.zeros(1, *w.shape[1:]), torch.zeros(w.shape[0], 1, *[1] * (w.ndim - 2)), alpha=1.0)


class DitAdapterPool(AdapterPool):
    """``AdapterPool`` over a diffusion transformer: host entries hold the file's layers by module name; a
    device slot holds a peft adapter attached to the transformer (module docstring: padding)."""

    def __init__(self, transformer: torch.nn.Module, family, *, num_slots: int = 16, host_cache: int = 64):
        super().__init__(transformer, num_slots=num_slots, host_cache=host_cache)
        self.family = family
        self.models = {COMPONENT: transformer}
        self.holders, self.holder = {}, None  # no SlotLora hooks: the flow sampler plans the peft layers
        self._modules = _Modules(transformer)
        self.padding: set[str] = set()  # the modules every attached adapter targets (padded with zeros)
        self._ids = itertools.count()
        self.stacks: OrderedDict[tuple, str] = OrderedDict()  # ((peft name, weight), ...) -> composite peft name
        self.batch_stacks: set[str] = set()  # the composites the batch being prepared uses (never dropped for room)

    def _read(self, path: Path) -> tuple[dict, dict]:
        adapter = read_adapter(path)
        made = guess_family(adapter)
        if made is not None and made != self.family.name:
            raise AdapterFamilyError(
                f"{path} is a LoRA for {_kind(made)}, but this server's base is {_kind(self.family.name)} "
                f"({type(self.unet).__name__}); register it on a server whose base is of its family"
            )
        others = [c for c in adapter.components() if c != COMPONENT]
        if others:
            raise AdapterLoadError(
                f"{path}: has {', '.join(others)} LoRA layers; a {self.family.name} server applies transformer "
                "layers only"
            )
        own = adapter.component(COMPONENT)
        layers = {}
        for p, (name, module) in resolve_targets(self._modules, adapter, COMPONENT).items():
            self.check_ratio(path, name, own[p], module)
            layers[name] = own[p]
        return layers, adapter_meta(adapter, own, layers)

    def ready(self) -> None:
        """Patch the transformer for row plans unless it is (it stays patched until an adapter is attached
        or detached). Only between transformer calls."""
        if patch_report(self.unet) is None and getattr(self.unet, "peft_config", None):
            patch_unet(self.unet)
            trust_adapter_weights(self.unet)  # weights change only through put/_evict, which unpatch first

    def _unpatch(self) -> None:
        """Undo the row-plan patch before peft attaches, deletes or reads its own layers."""
        if patch_report(self.unet) is not None:
            unpatch_unet(self.unet)

    def put(self, entry: Entry, slot: int) -> bool:
        """Attach ``entry`` to the transformer as the peft adapter of ``slot``; False when attaching failed
        (``entry.error`` says why, and its requests fail with AdapterLoadError). Only between transformer
        calls (``install``, from the scheduler thread)."""
        self._unpatch()
        try:
            if not self.padding.issuperset(entry.layers):
                self.padding |= set(entry.layers)
                self.drop_stacks()  # they lack the new modules
                for other in [e for e in self.slots if e is not None]:  # once, with the wider padding
                    peft = other.meta["peft"]
                    attached = extract_adapter(self.unet, peft, COMPONENT).component(COMPONENT)
                    self.unet.delete_adapters([peft])
                    self._attach(other, other.slot, attached)
            self._attach(entry, slot, entry.layers)
        except Exception as e:  # noqa: BLE001 - a file that passed registration but not peft: its requests fail
            entry.error = one_line(f"attaching it to the transformer failed: {type(e).__name__}: {e}")
            entry.layers = None
            self.host_lru.pop(id(entry), None)
            self.slots[slot] = None
            return False
        return True

    def _attach(self, entry: Entry, slot: int, layers: dict) -> None:
        full = {
            name: layers[name] if name in layers else _zero_layer(self._modules.named[name]) for name in self.padding
        }
        adapter = LoraAdapter({layer_key(COMPONENT, name): layer for name, layer in full.items()}, path=entry.path)
        peft = f"slot{slot}_{next(self._ids)}"  # a fresh peft name (adapter names may hold '.')
        attach_adapter(self.unet, adapter, peft, component=COMPONENT)
        entry.meta["peft"] = peft

    def stacked(self, parts: list[tuple[Entry, float]]) -> str:
        """The peft name of a composite adapter equal to ``parts`` (resident entries, weights) applied together
        (module docstring), attached on first use. Only between transformer calls."""
        key = tuple(sorted((e.meta["peft"], float(w)) for e, w in parts))
        name = self.stacks.get(key)
        if name is not None:
            self.stacks.move_to_end(key)
        else:
            self._unpatch()
            layers = [(extract_adapter(self.unet, peft, COMPONENT).component(COMPONENT), w) for peft, w in key]
            adapter = LoraAdapter(
                {layer_key(COMPONENT, m): stack_layers([(own[m], w) for own, w in layers]) for m in self.padding}
            )
            name = f"stack_{next(self._ids)}"
            attach_adapter(self.unet, adapter, name, component=COMPONENT)
            self.stacks[key] = name
        self.batch_stacks.add(name)
        spare = [k for k, v in self.stacks.items() if v not in self.batch_stacks]  # oldest first
        for old in spare[: max(0, len(self.stacks) - STACK_CACHE)]:
            self._unpatch()
            self.unet.delete_adapters([self.stacks.pop(old)])
        return name

    def drop_stacks(self, peft: str | None = None) -> None:
        """Detach the composite adapters that hold ``peft`` (None: all of them)."""
        for key in [k for k in self.stacks if peft is None or any(p == peft for p, _ in k)]:
            self._unpatch()
            self.unet.delete_adapters([self.stacks.pop(key)])

    def _evict(self, entry: Entry) -> None:
        self.drop_stacks(entry.meta["peft"])
        self._unpatch()
        self.unet.delete_adapters([entry.meta.pop("peft")])
        self.slots[entry.slot] = None
        self.resident_lru.pop(id(entry), None)
        entry.slot = None

    def close(self) -> None:
        """Detach every adapter: the transformer computes what it did before the pool."""
        self._unpatch()
        self.drop_stacks()
        for entry in [e for e in self.slots if e is not None]:
            self._evict(entry)
        self.padding.clear()


class DitScheduler(StepScheduler):
    """``StepScheduler`` whose step is a whole batch's run of the flow sampler (module docstring)."""

    samplers = ("euler",)  # the pipelines' flow-matching Euler

    def __init__(self, pipe, pool: DitAdapterPool, family, **limits):
        super().__init__(pipe, pool, **limits)
        self.family = family

    def check(self, request: GenerationRequest) -> None:
        if request.scheduler not in self.samplers:
            raise BadRequest(
                f"scheduler {request.scheduler!r}: a {self.family.name} base samples with its pipeline's "
                "flow-matching Euler; use 'euler' (the default)"
            )

    def batch_key(self, job: Job):
        req = job.request
        return job.size, req.steps, req.guidance, req.negative_prompt

    def _adapter(self, job: Job) -> tuple[str | None, float]:
        """(the peft adapter of the job's rows, their LoRA scale): (None, 0) for the base model (weight 0
        included), the adapter and its weight for one, a composite (``DitAdapterPool.stacked``) at 1 for several."""
        parts = [(e, w) for e, w in job.entries if w != 0.0]
        if not parts:
            return None, 0.0
        if len(parts) == 1:
            return parts[0][0].meta["peft"], float(parts[0][1])
        return self.pool.stacked(parts), 1.0

    def start(self, job: Job) -> None:
        """Nothing to prepare before the batch runs (the sampler encodes the prompts and draws the noise)."""
        job.timesteps = torch.arange(job.request.steps)  # the steps the engine's progress events count
        job.started = True

    @torch.no_grad()
    def step(self, jobs: list[Job]) -> list[Job]:
        """Every denoising step of ``jobs`` (one ``batch_key``) as one flow-sampler run: one transformer call
        per step over all their rows, each row at its request's adapter (or composite of stacked adapters)
        and weight; returns ``jobs`` (all done). A batch with NaN/Inf latents runs again one request at a
        time, so only the request that caused it fails (NonFiniteOutput at decode)."""
        jobs = sorted(jobs, key=lambda j: j.order)
        width, height = jobs[0].size
        req = jobs[0].request
        prompts, adapters, seeds, scales = [], [], [], []
        self.pool.batch_stacks.clear()
        peft_of = [self._adapter(job) for job in jobs]  # attaches composites of stacked adapters first
        self.pool.ready()
        for job, (peft, weight) in zip(jobs, peft_of):
            n = job.request.n
            prompts += [job.request.prompt] * n
            adapters += [peft] * n
            scales += [weight] * n
            seeds += [job.seed + k for k in range(n)]
        tic = time.perf_counter()
        try:
            latents = sample_flow_latents(
                self.base, prompts, adapters=adapters, seeds=seeds, steps=req.steps, guidance=req.guidance,
                height=height, width=width, negative_prompt=req.negative_prompt or None, scale=scales,
            )  # fmt: skip
        except NonFiniteLatents:
            if len(jobs) > 1:
                for job in jobs:
                    self.step([job])
                return jobs
            jobs[0].extra["error"] = nonfinite_error(jobs[0], "its images")
            latents = torch.empty(0)
        start = 0
        for job in jobs:
            job.latents = latents[start : start + job.request.n]
            start += job.request.n
            job.step = job.request.steps
            job.handle.peak_batch = max(job.handle.peak_batch, len(jobs))
        self.last_step_s = (time.perf_counter() - tic) / req.steps
        self.last_batch = len(prompts)
        return jobs

    @torch.no_grad()
    def decode(self, job: Job) -> list:
        """The job's pictures: the family's VAE decode and the pipeline's postprocessing, one row at a time
        (what ``sample_flow_images`` does)."""
        if "error" in job.extra:
            raise job.extra["error"]
        vae, images = self.base.vae, []
        for row in job.latents:
            pixels = self.family.decode_latents(vae, row[None].to(vae.device))
            images += self.base.image_processor.postprocess(pixels, output_type="pil")
        return images
