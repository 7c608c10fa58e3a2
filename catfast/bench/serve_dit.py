"""`catfast bench serve --model tiny-flux|tiny-sd3|tiny-qwenimage`: the DiT serving path (``catfast.serve.dit``)
measured with the UNet bench's definitions (``catfast.bench.serve``) where they carry over, in one process,
interleaved. The model is the named random-weight pipeline, written as a folder and served by an ``Engine``
(a ``DitAdapterPool``: a resident adapter is a peft adapter attached to the transformer). Images are ``size``
pixels square (default 32: 16 x 16 latents, 64 image tokens on the tiny models).

1. switch_ms: what a request for another resident adapter costs before its first step, with R adapters
   resident (R in ``resident``; the UNet bench counts adapters *registered*, with 2 slots: on the DiT pool
   every resident adapter is attached to the transformer and the row-planned layers carry all of them, so
   the resident count is what can make a switch grow). "resident": lookup, pin, LRU touch (the pool side,
   also reported alone as "pool"), then what ``sample_flow_latents`` does for it before its first Euler
   step besides encoding the prompt and drawing the noise: ``planned_unet`` on the transformer the pool
   keeps patched between batches (``DitAdapterPool.ready``: a check that the patch's slots are still the
   peft adapters), the row slots and ``RowPlan.build`` for one row. "cold_host": evict, then attach from the
   host tier (peft
   ``add_adapter`` and a weight copy); "cold_disk": read and check the file, then attach. "run_ms": one
   1-row, 2-step sampler run with R resident (the row-planned layers stack every resident adapter's A and B
   each call). With ``--full`` R also takes 1024; attaching one adapter grows with R (about 0.3 s each at
   256 on the dev CPU), so filling 1024 slots takes many minutes.
2. mixed: one ``sample_flow_latents`` run (every Euler step one transformer call over all rows; the text
   encoding and noise included, the same on every side) of ``batch`` rows (same prompts, seeds, steps) on
   N distinct adapters (N in ``mixed``; 16 resident), against the same rows on one unmerged adapter (N = 1,
   16 resident: the serving state), on that adapter alone attached to its own copy of the transformer
   ("one_resident"), on a plain copy with that adapter merged into the weights ("merged": no peft layers,
   no row plan) and on the plain copy ("base"). Wall time of the run, the sides interleaved per repetition,
   median. ``ratio_N`` = N / 1; ``unmerged_vs_merged`` = N = 1 (16 resident) / merged, as for the UNet;
   ``one_resident_vs_merged`` the same with one adapter resident. Parity: each row of the N = max run
   against that row run alone on its adapter (``max_rel_err_vs_alone``; max|a - b| / max|b| over the
   latents), and the N = 1 run against the merged one (``merged_rel_err``).
3. launch_ops: aten ops that launch work (``catfast.bench.launches``) of ONE sampler step (a 3-step run
   minus a 2-step run, as Qwen-Image's scheduler gives NaN at 1 step: the transformer call, its row plan and the
   scheduler step), at 1 row: one adapter unmerged (1 resident; and 16 resident) against merged weights; and
   ``batch`` rows on ``max(mixed)`` adapters. On a GPU at batch 1 each launching op is a kernel launch, and the
   launches decide the time.

No diffusers baseline and no throughput phase here: diffusers' Flux/SD3/Qwen-Image pipelines call
``set_adapters`` like the UNet one (what the UNet bench measures), and the DiT engine runs a batch as one
sampler run, so phase 3 of the UNet bench would time the same sampler as phase 2.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from catfast.adapters.formats import read_adapter, write_adapter
from catfast.adapters.merge import merge_adapter_, unmerge_adapter_
from catfast.bench.launches import count_step
from catfast.bench.measure import rel_err
from catfast.bench.serve import cold_switch, run_header
from catfast.eval.flow_sampler import sample_flow_latents
from catfast.integrations.row_call import planned_unet
from catfast.rows import RowPlan
from catfast.serve.engine import Engine

MODELS = ("tiny-flux", "tiny-sd3", "tiny-qwenimage")  # the DiT models with a pipeline (factory_dit.PIPELINE_NAMES)
COMPONENT = "transformer"
QUICK = dict(resident=(1, 16, 256))
FULL = dict(resident=(1, 16, 256, 1024))
PHASES = ("adapter switch", "one mixed sampler run", "launching ops")
PROMPT = "a photo of a cat"


@contextlib.contextmanager
def _quiet():
    """Without peft's warnings about a model with several adapters and about deleting the active one (what the
    pool does on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 4)


def _write_adapters(model: str, count: int, rank: int, folder: Path) -> list[Path]:
    """``count`` random rank-``rank`` adapters (alpha = rank) on the family's default targets."""
    from catfast.integrations.factory_dit import FAMILY_OF_NAME, build_transformer  # lazy: diffusers
    from catfast.integrations.families import FAMILIES
    from catfast.integrations.peft_adapters import add_lora, extract_adapter, randomize_lora_

    transformer = build_transformer(model)
    add_lora(transformer, rank=rank, alpha=float(rank), target_modules=FAMILIES[FAMILY_OF_NAME[model]].default_targets,
             adapter_name="x")  # fmt: skip
    paths = []
    for i in range(count):
        randomize_lora_(transformer, seed=100 + i, std=0.05)
        path = folder / f"a{i}.safetensors"
        write_adapter(extract_adapter(transformer, "x", COMPONENT), path)
        paths.append(path)
    return paths


def _engine(pipeline: Path, paths, count: int) -> tuple[Engine, torch.nn.Module]:
    """(an engine over the pipeline folder with ``count`` adapters registered (r0, r1, ...; the files reused
    under other names) and resident, a copy of its transformer taken before any was attached)."""
    engine = Engine(str(pipeline), max_resident=count, host_cache=count)
    plain = copy.deepcopy(engine.unet)
    with _quiet():
        for i in range(count):
            engine.load_adapter(f"r{i}", paths[i % len(paths)])
            engine.pool.install(engine.pool.lookup(f"r{i}"))
    engine.pool.ready()  # the serving state: patched for row plans, as the scheduler leaves it between batches
    return engine, plain


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def _switch(pipeline, paths, resident, reps, size, log) -> dict:
    out = {k: {} for k in ("resident", "pool", "cold_host", "cold_disk", "run_ms", "attach_fill_s")}
    for count in resident:
        tic = time.perf_counter()
        engine, _ = _engine(pipeline, paths, count)
        out["attach_fill_s"][count] = round(time.perf_counter() - tic, 2)
        pool, transformer = engine.pool, engine.unet
        # one parameter's device, as the sampler reads it: diffusers' ModelMixin.device walks every module (with
        # 256 adapters attached that walk was 20 ms of the measured switch, a cost the server never pays)
        device = next(transformer.parameters()).device
        names = [f"r{i}" for i in range(count)]

        def run(peft: str) -> None:
            sample_flow_latents(engine.base, [PROMPT], adapters=[peft], seeds=[0], steps=2, height=size, width=size)

        run(pool.lookup(names[0]).meta["peft"])
        times = {"resident": [], "pool": [], "step": []}
        for rep in range(reps):
            name = names[0] if count == 1 else names[(rep % (count - 1)) + 1 if rep % 2 else 0]
            tic = time.perf_counter()
            entry = pool.lookup(name)
            pool.install(entry)  # resident: a no-op
            entry.running += 1
            pool.touch(entry)
            times["pool"].append(time.perf_counter() - tic)
            peft = entry.meta["peft"]
            with planned_unet(transformer, [peft], purpose="sample") as call:
                RowPlan.build(call.slots([peft]), [1.0], needs_grad=False, device=device)
            times["resident"].append(time.perf_counter() - tic)
            entry.running -= 1
            _sync()
            tic = time.perf_counter()
            run(peft)
            _sync()
            times["step"].append(time.perf_counter() - tic)
        cold_host, cold_disk = [], []
        with _quiet():
            for rep in range(min(reps, 3)):  # each attach invalidates the cached patch; a few suffice
                host_s, disk_s = cold_switch(pool, pool.lookup(names[rep % count]))
                cold_host.append(host_s)
                cold_disk.append(disk_s)
            engine.close()
        out["resident"][count] = _median_ms(times["resident"])
        out["pool"][count] = _median_ms(times["pool"])
        out["run_ms"][count] = _median_ms(times["step"])
        out["cold_host"][count] = _median_ms(cold_host)
        out["cold_disk"][count] = _median_ms(cold_disk)
        log(f"switch, {count} resident: {out['resident'][count]} ms (pool {out['pool'][count]} ms), cold host "
            f"{out['cold_host'][count]} ms, a 1-row 2-step run {out['run_ms'][count]} ms")  # fmt: skip
    values = list(out["resident"].values())
    out["flat"] = {"max_over_min": round(max(values) / min(values), 3), "max_ms": max(values)}
    return out


def _copies(engine: Engine, base: torch.nn.Module, adapter_path: Path):
    """(a pipeline on a copy of the plain transformer ``base`` with only ``adapter_path`` attached, a pipeline
    on ``base``) sharing the engine pipeline's text encoders, VAE and scheduler."""
    from catfast.integrations.peft_adapters import attach_adapter  # lazy: peft

    pipe = engine.base
    one = copy.deepcopy(base)
    attach_adapter(one, read_adapter(adapter_path), "one", component=COMPONENT)
    make = lambda t: type(pipe)(**{**pipe.components, "transformer": t})  # noqa: E731
    return make(one), make(base)


@torch.no_grad()
def _mixed(engine, plain_transformer, paths, mixed, batch, steps, size, reps, log) -> tuple[dict, dict]:
    pool = engine.pool
    peft = [pool.lookup(f"r{i}").meta["peft"] for i in range(max(mixed))]
    one_pipe, plain_pipe = _copies(engine, plain_transformer, paths[0])
    adapter0 = read_adapter(paths[0])
    prompts, seeds = [PROMPT] * batch, list(range(batch))

    def rows(n: int) -> list[str]:  # N adapters in N equal runs of rows
        per = batch // n
        return [peft[min(i // per, n - 1)] for i in range(batch)]

    def sample(pipe, adapters, *, rows_prompts=prompts, row_seeds=seeds, n_steps=steps):
        return sample_flow_latents(pipe, rows_prompts, adapters=adapters, seeds=row_seeds, steps=n_steps,
                                   height=size, width=size)  # fmt: skip

    runs = {f"n{n}": (lambda n=n: sample(engine.base, rows(n))) for n in mixed}
    runs["one_resident"] = lambda: sample(one_pipe, ["one"] * batch)
    runs["merged"] = lambda: sample(plain_pipe, [None] * batch)
    runs["base"] = lambda: sample(plain_pipe, [None] * batch)
    plain = plain_pipe.transformer
    outputs = {}
    for name, run in runs.items():  # warm-up round, and the outputs parity is checked on
        if name == "merged":
            merge_adapter_(plain, adapter0, COMPONENT)
        outputs[name] = run()
        if name == "merged":
            unmerge_adapter_(plain, adapter0, COMPONENT)
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            if name == "merged":
                merge_adapter_(plain, adapter0, COMPONENT)
            _sync()
            tic = time.perf_counter()
            run()
            _sync()
            times[name].append(time.perf_counter() - tic)
            if name == "merged":
                unmerge_adapter_(plain, adapter0, COMPONENT)
    ms = {k: _median_ms(v) for k, v in times.items()}
    top = max(mixed)
    mixed_rows, alone = rows(top), []
    for i in range(batch):  # each row of the most mixed run, alone on its adapter
        got = sample(engine.base, [mixed_rows[i]], rows_prompts=[PROMPT], row_seeds=[i])
        alone.append(rel_err(outputs[f"n{top}"][i : i + 1], got))
    one = ms[f"n{mixed[0]}"]
    result = {"rows": batch, "steps": steps, "size": size, "resident": top, "median_ms": ms}
    for n in mixed:
        result[f"ratio_{n}"] = round(ms[f"n{n}"] / one, 4)
    result["unmerged_vs_merged"] = round(one / ms["merged"], 4)
    result["one_resident_vs_merged"] = round(ms["one_resident"] / ms["merged"], 4)
    result["unmerged_vs_base"] = round(one / ms["base"], 4)
    result["max_rel_err_vs_alone"] = max(alone)
    result["merged_rel_err"] = rel_err(outputs[f"n{mixed[0]}"], outputs["merged"])
    result["one_resident_rel_err"] = rel_err(outputs[f"n{mixed[0]}"], outputs["one_resident"])
    log(f"mixed sampler run, {batch} rows, {steps} steps: {ms}")
    return result, dict(rows=rows, sample=sample, one_pipe=one_pipe, plain_pipe=plain_pipe, adapter0=adapter0,
                        peft=peft)  # fmt: skip


@torch.no_grad()
def _launch_ops(engine, ctx, batch, top, log) -> dict:
    sample, peft = ctx["sample"], ctx["peft"]

    def per_step(pipe, adapters) -> tuple[int, int]:
        k = len(adapters)
        counts = [
            count_step(
                lambda s=s: sample(pipe, adapters, rows_prompts=[PROMPT] * k, row_seeds=list(range(k)), n_steps=s)
            )  # fmt: skip
            for s in (2, 3)
        ]
        return counts[1].launch_ops - counts[0].launch_ops, counts[1].host_syncs - counts[0].host_syncs

    plain = ctx["plain_pipe"].transformer
    merge_adapter_(plain, ctx["adapter0"], COMPONENT)
    try:
        merged, _ = per_step(ctx["plain_pipe"], [None])
    finally:
        unmerge_adapter_(plain, ctx["adapter0"], COMPONENT)
    unmerged, syncs = per_step(ctx["one_pipe"], ["one"])
    served, _ = per_step(engine.base, [peft[0]])
    mixed, mixed_syncs = per_step(engine.base, ctx["rows"](top))
    result = {
        "rows": 1,
        "merged": merged,
        "unmerged": unmerged,
        "ratio": round(unmerged / merged, 4),
        f"unmerged_{top}_resident": served,
        f"mixed_{top}_rows_{batch}": mixed,
        "host_syncs": syncs,
        "host_syncs_mixed": mixed_syncs,
    }
    log(f"launching ops of one sampler step, 1 row: unmerged {unmerged} (1 resident), {served} ({top} resident), "
        f"merged {merged} ({result['ratio']}x); {batch} rows on {top} adapters: {mixed}")  # fmt: skip
    return result


def bench_serve_dit(
    model: str = "tiny-flux",
    *,
    resident=QUICK["resident"],
    mixed=(1, 4, 16),
    batch: int = 16,
    steps: int = 10,
    size: int = 32,
    rank: int = 4,
    reps: int = 5,
    log=print,
) -> dict:
    """Run the three DiT benchmarks (module docstring) and return one JSON-able dict."""
    from catfast.integrations.factory_dit import init_dit_folder  # lazy: diffusers

    if model not in MODELS:
        raise ValueError(f"unknown DiT model {model!r}; choose one of {', '.join(MODELS)}")
    if max(mixed) > batch:
        raise ValueError(f"--batch {batch} must be at least the largest --mixed count {max(mixed)}")
    tic = time.perf_counter()

    def phase(k: int, what: str) -> None:
        log(f"[{k}/{len(PHASES)}] {PHASES[k - 1]}: {what} ({time.perf_counter() - tic:.0f} s so far)")

    with tempfile.TemporaryDirectory() as tmp:
        count = max(max(mixed), 1)
        log(f"writing the {model} pipeline folder and {count} random rank-{rank} adapters")
        pipeline = init_dit_folder(model, Path(tmp) / model)
        paths = _write_adapters(model, count, rank, Path(tmp))
        result = run_header(model, rank) | {
            "settings": dict(resident=list(resident), mixed=list(mixed), batch=batch, steps=steps, size=size,
                             reps=reps),
        }  # fmt: skip
        phase(1, f"{', '.join(map(str, resident))} resident, {reps} reps")
        result["switch_ms"] = _switch(pipeline, paths, list(resident), reps, size, log)
        phase(2, f"{batch} rows with {', '.join(map(str, mixed))} distinct adapters, {steps} steps, {reps} reps")
        engine, plain = _engine(pipeline, paths, count)
        try:
            result["mixed"], ctx = _mixed(engine, plain, paths, list(mixed), batch, steps, size, reps, log)
            phase(3, "one sampler step, counted")
            result["launch_ops"] = _launch_ops(engine, ctx, batch, count, log)
        finally:
            with _quiet():
                engine.close()
    result["seconds"] = round(time.perf_counter() - tic, 1)
    log(f"done in {result['seconds']:.0f} s")
    return result
