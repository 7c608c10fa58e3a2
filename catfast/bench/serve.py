"""`catfast bench serve`: the serving engine against diffusers on the same random-weight model, in one
process, interleaved.

1. switch_ms: the host-side cost of switching a request to another adapter with R adapters registered
   (R in ``registered``): "resident" (lookup, pin, build the segment plan: what the scheduler does per
   request), "cold_host" (install from the host tier: tensor copies into a slot), "cold_disk" (read and
   check the file, then install). Baselines on a diffusers pipeline with min(R, ``diffusers_max``)
   adapters loaded by ``load_lora_weights``: ``set_adapters`` to another adapter, and
   ``unfuse_lora`` + ``set_adapters`` + ``fuse_lora``.
2. mixed: one UNet call (a denoising step) on ``batch`` rows whose rows use N distinct adapters (N in
   ``mixed``), against the same rows on one unmerged adapter (N = 1), on that adapter merged into the
   weights (no LoRA work at all), and on the base alone.
3. throughput: ``requests`` requests spread over ``adapters`` adapters through the engine, against a
   diffusers pipeline that calls ``set_adapters`` per request and runs it alone.

Adapter files: ``adapters`` distinct random adapters (rank ``rank``, attention targets, random B);
registrations beyond that reuse the files under other names (each is its own registry entry).

The defaults (``QUICK``) load at most 16 adapters into the diffusers baseline and run 32 throughput
requests: a few minutes on a CPU. ``FULL`` (``catfast bench serve --full``) is the whole sweep: diffusers
with up to 1024 adapters loaded (``load_lora_weights`` one by one: it ran past 20 minutes on the dev CPU)
and 64 requests. Each phase prints a progress line as it starts.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from catfast.adapters.formats import read_adapter, write_adapter
from catfast.adapters.merge import merge_adapter_, unmerge_adapter_
from catfast.bench.measure import git_commit
from catfast.bench.serve_launches import serve_launch_ops
from catfast.integrations.factory import build_base, build_unet
from catfast.integrations.models import diffusers_pipeline
from catfast.integrations.peft_adapters import add_lora, extract_adapter, randomize_lora_
from catfast.integrations.row_call import run_segmented
from catfast.ops.segmented import Segment, SegmentPlan
from catfast.serve.engine import Engine
from catfast.serve.requests import GenerationRequest
from catfast.targets import ATTENTION_PROJECTIONS

TARGETS = ATTENTION_PROJECTIONS
# the settings `--full` changes (every other default is shared)
QUICK = dict(diffusers_max=16, requests=32)
FULL = dict(diffusers_max=1024, requests=64)
PHASES = ("adapter switch", "one mixed step", "throughput")


def _write_adapters(model: str, count: int, rank: int, folder: Path) -> list[Path]:

    paths = []
    for i in range(count):
        unet = build_unet(model)
        add_lora(unet, rank=rank, alpha=float(rank), target_modules=TARGETS, adapter_name="x")
        randomize_lora_(unet, seed=100 + i, std=0.05)
        path = folder / f"a{i}.safetensors"
        write_adapter(extract_adapter(unet, "x"), path)
        paths.append(path)
        del unet
    return paths


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 4)


def cold_switch(pool, entry) -> tuple[float, float]:
    """Seconds to make resident entry ``entry`` resident again after evicting it: from the host tier, then
    (evicted again) from disk (read and check the file, then install). It ends resident."""
    pool._evict(entry)
    tic = time.perf_counter()
    pool.install(entry)
    host_s = time.perf_counter() - tic
    pool._evict(entry)
    tic = time.perf_counter()
    layers, _ = pool.read_file(entry.path)
    pool.keep_on_host(entry, layers)
    pool.install(entry)
    return host_s, time.perf_counter() - tic


def run_header(model: str, rank: int) -> dict:
    """What a serving bench's result starts with: the model, the device, threads, rank, torch and commit."""
    return {
        "model": model,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rank": rank,
        "torch": torch.__version__,
        "git": git_commit(),
    }


def _pipeline(model: str):

    return diffusers_pipeline(build_base(model))


@torch.no_grad()
def _switch(model, paths, registered, reps, diffusers_max, log) -> dict:

    out = {"resident": {}, "cold_host": {}, "cold_disk": {}, "diffusers_set_adapters": {}, "diffusers_fuse": {}}
    for count in registered:
        engine = Engine(build_base(model), max_resident=2, host_cache=max(count, 2))
        pool = engine.pool
        for i in range(count):
            engine.load_adapter(f"r{i}", paths[i % len(paths)])
        names = [f"r{i}" for i in range(count)]
        resident, cold_host, cold_disk = [], [], []
        pool.install(pool.lookup(names[0]))
        for rep in range(reps):
            # resident: a request switching to an adapter already in a slot
            name = names[0] if count == 1 else names[(rep % (count - 1)) + 1 if rep % 2 else 0]
            pool.install(pool.lookup(name))  # (untimed) make it resident
            tic = time.perf_counter()
            entry = pool.lookup(name)
            pool.install(entry)
            entry.running += 1
            pool.touch(entry)
            SegmentPlan(2, [Segment(0, 2, ((entry.slot, 1.0),))], device=engine.device)
            entry.running -= 1
            resident.append(time.perf_counter() - tic)
            host_s, disk_s = cold_switch(pool, entry)
            cold_host.append(host_s)
            cold_disk.append(disk_s)
        engine.close()
        out["resident"][count] = _median_ms(resident)
        out["cold_host"][count] = _median_ms(cold_host)
        out["cold_disk"][count] = _median_ms(cold_disk)
        loaded = min(count, diffusers_max)
        if loaded < 1:
            continue
        pipe = _pipeline(model)
        tic = time.perf_counter()
        for i in range(loaded):
            pipe.load_lora_weights(str(paths[i % len(paths)]), adapter_name=f"r{i}")
        load_s = (time.perf_counter() - tic) / loaded
        set_times, fuse_times = [], []
        for rep in range(reps):
            name = f"r{rep % loaded}"
            tic = time.perf_counter()
            pipe.set_adapters([name])
            set_times.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            pipe.unfuse_lora()
            pipe.set_adapters([name])
            pipe.fuse_lora(adapter_names=[name])
            fuse_times.append(time.perf_counter() - tic)
        pipe.unfuse_lora()
        out["diffusers_set_adapters"][count] = _median_ms(set_times)
        out["diffusers_fuse"][count] = _median_ms(fuse_times)
        out.setdefault("diffusers_load_ms", {})[count] = round(load_s * 1e3, 2)
        if loaded != count:
            out.setdefault("diffusers_loaded", {})[count] = loaded
        log(f"switch, {count} registered: resident {out['resident'][count]} ms, diffusers set_adapters "
            f"{out['diffusers_set_adapters'][count]} ms")  # fmt: skip
        del pipe
    return out


@torch.no_grad()
def _mixed(model, paths, mixed, batch, reps, log) -> dict:

    engine = Engine(build_base(model), max_resident=max(max(mixed), 1))
    unet, pool = engine.unet, engine.pool
    for i in range(max(mixed)):
        engine.load_adapter(f"m{i}", paths[i % len(paths)])
        pool.install(pool.lookup(f"m{i}"))
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(engine.device)
    t = torch.full((batch,), 500, dtype=torch.int64, device=engine.device)
    h = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(engine.device)
    plans = {}
    for n in mixed:
        per = batch // n
        segs = [Segment(i * per, (i + 1) * per if i < n - 1 else batch, ((i, 1.0),)) for i in range(n)]
        plans[n] = SegmentPlan(batch, segs, device=engine.device)
    adapter0 = read_adapter(paths[0])

    def call(plan):
        if plan is None:
            return unet(x, t, encoder_hidden_states=h, return_dict=False)[0]
        return run_segmented(unet, pool.holder, plan, x, t, encoder_hidden_states=h)

    def sync():
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    times = {f"n{n}": [] for n in mixed} | {"merged": [], "base": []}
    for _ in range(2):  # warm-up
        call(plans[mixed[0]])
    for _ in range(reps):
        for n in mixed:
            sync()
            tic = time.perf_counter()
            call(plans[n])
            sync()
            times[f"n{n}"].append(time.perf_counter() - tic)
        merge_adapter_(unet, adapter0)
        sync()
        tic = time.perf_counter()
        call(None)
        sync()
        times["merged"].append(time.perf_counter() - tic)
        unmerge_adapter_(unet, adapter0)
        sync()
        tic = time.perf_counter()
        call(None)
        sync()
        times["base"].append(time.perf_counter() - tic)
    engine.close()
    result = {"rows": batch, "median_ms": {k: _median_ms(v) for k, v in times.items()}}
    ms = result["median_ms"]
    one = ms[f"n{mixed[0]}"]
    for n in mixed:
        result[f"ratio_{n}"] = round(ms[f"n{n}"] / one, 4)
    result["unmerged_vs_merged"] = round(one / ms["merged"], 4)
    result["unmerged_vs_base"] = round(one / ms["base"], 4)
    log(f"mixed step, {batch} rows: {ms}")
    return result


def _throughput(model, paths, requests, adapters, steps, max_batch, log) -> dict:

    prompts = [f"a photo number {i}" for i in range(requests)]
    names = [f"t{i % adapters}" for i in range(requests)]
    engine = Engine(build_base(model), max_batch=max_batch, max_resident=adapters, max_queue=requests, timeout_s=1e6)
    with engine:  # (no deadline: the last of the requests waits for every batch before it)
        for i in range(adapters):
            engine.load_adapter(f"t{i}", paths[i % len(paths)])
        engine.generate("warm up", steps=1, seed=0)
        tic = time.perf_counter()
        handles = [
            engine.submit(GenerationRequest(p, adapters={a: 1.0}, steps=steps, seed=i))
            for i, (p, a) in enumerate(zip(prompts, names))
        ]
        for h in handles:
            h.result()
        ours = time.perf_counter() - tic
    pipe = _pipeline(model)
    for i in range(adapters):
        pipe.load_lora_weights(str(paths[i % len(paths)]), adapter_name=f"t{i}")
    pipe("warm up", num_inference_steps=1)
    tic = time.perf_counter()
    for i, (p, a) in enumerate(zip(prompts, names)):
        pipe.set_adapters([a])
        pipe(p, num_inference_steps=steps, generator=torch.Generator().manual_seed(i), guidance_scale=5.0)
    theirs = time.perf_counter() - tic
    result = {
        "requests": requests,
        "adapters": adapters,
        "steps": steps,
        "max_batch": max_batch,
        "engine_images_per_s": round(requests / ours, 4),
        "diffusers_images_per_s": round(requests / theirs, 4),
        "vs_diffusers": round(theirs / ours, 4),
    }
    log(f"throughput: {result}")
    return result


def bench_serve(
    model: str = "tiny",
    *,
    registered=(1, 64, 1024),
    mixed=(1, 4, 16),
    batch: int = 16,
    requests: int = QUICK["requests"],
    adapters: int = 16,
    steps: int = 10,
    max_batch: int = 16,
    rank: int = 4,
    reps: int = 5,
    diffusers_max: int = QUICK["diffusers_max"],
    device: str | None = None,
    log=print,
) -> dict:
    """Run the three benchmarks (module docstring) and return one JSON-able dict; ``log`` gets a line as
    each phase starts (and the phases' own results as they come)."""
    if device is not None and device != ("cuda" if torch.cuda.is_available() else "cpu"):
        raise ValueError("the serving bench runs on the default device")
    if max(mixed) > batch:
        raise ValueError(f"--batch {batch} must be at least the largest --mixed count {max(mixed)}")
    tic = time.perf_counter()

    def phase(k: int, what: str) -> None:
        log(f"[{k}/{len(PHASES)}] {PHASES[k - 1]}: {what} ({time.perf_counter() - tic:.0f} s so far)")

    with tempfile.TemporaryDirectory() as tmp:
        count = max(adapters, max(mixed), 1)
        log(f"writing {count} random rank-{rank} adapters of the {model} model")
        paths = _write_adapters(model, count, rank, Path(tmp))
        result = run_header(model, rank) | {
            "settings": dict(registered=list(registered), mixed=list(mixed), batch=batch, requests=requests,
                             adapters=adapters, steps=steps, max_batch=max_batch, reps=reps,
                             diffusers_max=diffusers_max),
        }  # fmt: skip
        loaded = ", ".join(str(min(c, diffusers_max)) for c in registered)
        phase(1, f"{', '.join(map(str, registered))} registered; diffusers with {loaded} loaded, {reps} reps")
        result["switch_ms"] = _switch(model, paths, list(registered), reps, diffusers_max, log)
        phase(2, f"{batch} rows with {', '.join(map(str, mixed))} distinct adapters, {reps} reps")
        result["mixed"] = _mixed(model, paths, list(mixed), batch, reps, log)
        result["launch_ops"] = serve_launch_ops(model, paths[: max(mixed)], batch, log=log)  # vs merged weights
        phase(3, f"{requests} requests over {adapters} adapters, {steps} steps each, engine then diffusers")
        result["throughput"] = _throughput(model, paths, requests, adapters, steps, max_batch, log)
    result["seconds"] = round(time.perf_counter() - tic, 1)
    log(f"done in {result['seconds']:.0f} s")
    return result
