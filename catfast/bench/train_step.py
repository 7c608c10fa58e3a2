"""`catfast bench train-step`: catfast's CAT step modes against today's CAT / preservation steps, interleaved
in one process.

For each entry (catfast's modes ``reference`` and ``fused``, with ``layouts=True`` also the fused step in each
of its layouts, ``fused:one-call`` and ``fused:teacher-first``, and the contestants of
``catfast.bench.contestants``: ``official``, ``ai-toolkit``, ``kohya``; with ``graphs=True`` on CUDA also
``fused:graphed``, the one-call fused step's forward and backward replayed as one captured CUDA graph), one step is
its loss forward + backward on the same random-weight UNet (catfast's factories), with a LoRA on every attention
projection (the CAT paper's targets) and random, nonzero B, on the same batch and seed; catfast's fused entries run
on the UNet patched once, as the trainer runs them. Reported per entry:

- ``median_ms``: median wall time of the timed steps; the entries alternate step by step after one warm-up
  round, so machine load falls on all of them alike; ``median_cpu_ms``: the same steps' process CPU time
  (all threads), steadier than wall time where other processes share the cores;
- ``fwd_flops`` / ``bwd_flops`` (``measure.flop_counter``, attention included) and ``achieved_flops``
  (FLOP/s of the median step) with ``gemm_fraction``: that rate over the dense GEMM rate measured in the same
  run (``gemm_flops``: a square matmul, the step's dtype and thread count, before and after the timed steps);
- ``saved_bytes``: unique storages autograd packs for backward, parameters excluded;
- ``param_bytes``: parameters and buffers of every model the entry holds (the official code's second UNet
  counts);
- ``peak_bytes``: on CUDA the allocator's peak of the step; on the CPU the peak RSS (VmHWM) of a fresh
  process that builds the same model(s), resets its high-water mark (``/proc/self/clear_refs``) and runs
  two steps of this entry alone (``peak_rss_setup_bytes``: its RSS before the steps, models loaded);
- ``loss_rel_err`` / ``grad_rel_err``: parity with catfast's reference step where the loss is the same
  (kohya's loss is half of it, see ``contestants.LOSS_FACTOR``).

- ``launch_ops`` / ``host_syncs``: the aten ops of one step that launch work (views and bare allocations
  excluded) and that make the host wait for the device (``catfast.bench.launches``), with ``launch_ops_by_op``
  (the ten most issued); ``host_ms``: median wall time the host spends issuing a step, without waiting for
  the device (on the CPU the step's time). On ``sd15-skeleton`` (SD1.5's module structure at widths where
  arithmetic is negligible) these are the CPU stand-in for a batch-1 GPU step, which is bound by what the
  host issues.

``conv_gemm``: of the convolution shapes (forward and input gradient apart) the fused step timed
(``catfast.ops.conv``), how many run as im2col + GEMM.

``mixed_precision="bf16"`` runs every entry under bf16 autocast (fp32 weights; the loss reduced in fp32);
``auto`` is the default-settings run: bf16 where the device has it and a bf16 GEMM is 1.2x an fp32 one, else fp32.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from catfast.bench.contestants import CONTESTANTS, LOSS_FACTOR, check_names, make_contestant
from catfast.bench.launches import count_step
from catfast.bench.measure import SavedBytes, flop_counter, git_commit, rel_err
from catfast.bench.precision import _autocast_factory, gemm_rate, resolve_mixed_precision
from catfast.errors import CatfastError
from catfast.integrations.factory import build_unet
from catfast.integrations.patch import patch_unet, unpatch_unet
from catfast.integrations.peft_adapters import add_lora, randomize_lora_
from catfast.integrations.schedulers import training_scheduler
from catfast.ops.conv import choices as conv_choices
from catfast.targets import ATTENTION_PROJECTIONS
from catfast.train.objective import CatLossOutput, auto_mode, cat_loss

TARGETS = ATTENTION_PROJECTIONS
TOKENS = 77
MODES = ("reference", "fused")
LAYOUT_MODES = ("fused:one-call", "fused:teacher-first")  # cat_loss(mode="fused", layout=...)
GRAPHED = "fused:graphed"  # the one-call fused step replayed as a CUDA graph (--graphs)


def _setup(model: str, batch: int, rank: int, dtype: torch.dtype, device: str, seed: int, targets=TARGETS):
    unet = build_unet(model, seed=seed)
    add_lora(unet, rank=rank, alpha=rank, target_modules=targets)  # freezes the UNet
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

    def load_teacher():  # the official code loads the checkpoint again: the same seeded weights
        return build_unet(model, seed=seed)

    return unet, training_scheduler(), batch_args, load_teacher


def _loss_fns(names, unet, sched, batch_args, load_teacher) -> dict:
    """name -> (zero-argument forward returning a CatLossOutput, the modules the entry holds, a context the
    entry's steps run in). catfast's fused entries run on the UNet patched once, as the trainer runs them (the
    patch is put on and taken off around each step, outside the timed region); ``fused:graphed`` (CUDA) replays
    the fused step's forward and backward as one captured CUDA graph (``catfast.train.graphs``)."""
    fns = {}
    for name in names:
        if name == "reference":
            fns[name] = (lambda: cat_loss(unet, sched, **batch_args, mode="reference"), (unet,), contextlib.nullcontext)
        elif name in MODES or name in LAYOUT_MODES:
            layout = name.split(":")[1] if ":" in name else "auto"
            fns[name] = (lambda lay=layout: cat_loss(unet, sched, **batch_args, mode="fused", layout=lay), (unet,),
                         lambda: _patched(unet))  # fmt: skip
        elif name == GRAPHED:
            fns[name] = (_graphed_fused(unet, sched, batch_args), (unet,), lambda: _patched(unet))
        else:
            c = make_contestant(name, unet, sched, load_teacher)
            fns[name] = (lambda c=c: c.loss(**batch_args), c.modules, contextlib.nullcontext)
    return fns


@contextlib.contextmanager
def _patched(unet):
    patch_unet(unet)
    try:
        yield
    finally:
        unpatch_unet(unet)


def _graphed_fused(unet, sched, batch_args):
    """The fused step (one call) as a replayed CUDA graph: a zero-argument loss function whose result carries
    no graph (the backward ran inside the replay, into the graph's own gradient buffers)."""
    from catfast.train.graphs import GraphedSteps  # lazy: train's graph capture, CUDA only

    def body(inputs):
        loss = cat_loss(unet, sched, **inputs, mode="fused", layout="one-call")
        loss.total.backward()
        return torch.stack([loss.total.detach(), loss.ldm.detach(), loss.cat.detach()])

    graphed = GraphedSteps(body, lambda: unet.zero_grad(set_to_none=True))

    def loss_fn():
        total, ldm, cat = graphed.run(batch_args)
        return CatLossOutput(total=total, ldm=ldm, cat=cat)

    loss_fn.graphed = True
    return loss_fn


def _step(unet, loss_fn, autocast):
    if getattr(loss_fn, "graphed", False):  # a replay computes the gradients into its own buffers
        return loss_fn()
    unet.zero_grad(set_to_none=True)
    with autocast():
        out = loss_fn()
    out.total.backward()
    return out


def _measure_once(unet, loss_fn, autocast, context=contextlib.nullcontext) -> dict:
    """FLOPs of forward and backward, unique bytes autograd saved (parameters excluded), and what one step
    issues. One step runs first, uncounted: the first call of each convolution shape times its algorithms
    (``catfast.ops.conv``), whose runs the counter would add to the step's FLOPs. A graphed entry replays what
    was captured: no FLOPs or saved bytes are seen, its launching ops are the copies into the graph's input
    buffers."""
    with context():
        _step(unet, loss_fn, autocast)
        if getattr(loss_fn, "graphed", False):
            for _ in range(3):  # through its eager warm-up steps to the capture
                _step(unet, loss_fn, autocast)
            figures = {"out": _step(unet, loss_fn, autocast), "grads": _lora_grads(unet)}
        else:
            figures = _flops_and_saved(unet, loss_fn, autocast)
        launches = count_step(lambda: _step(unet, loss_fn, autocast))
    return figures | dict(launch_ops=launches.launch_ops, launch_ops_by_op=dict(launches.launches.most_common(10)),
                          host_syncs=launches.host_syncs)  # fmt: skip


def _lora_grads(unet) -> dict:
    return {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _flops_and_saved(unet, loss_fn, autocast) -> dict:
    """One eager step's forward and backward FLOPs, saved bytes, output and LoRA gradients."""
    unet.zero_grad(set_to_none=True)
    with flop_counter() as fwd, SavedBytes(unet) as saved, autocast():
        out = loss_fn()
    with flop_counter() as bwd:
        out.total.backward()
    return dict(fwd_flops=fwd.get_total_flops(), bwd_flops=bwd.get_total_flops(), saved_bytes=saved.total,
                out=out, grads=_lora_grads(unet))  # fmt: skip


def _param_bytes(modules) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


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
    against: tuple[str, ...] | list[str] = CONTESTANTS,
    mixed_precision: str = "no",
    memory: bool = True,
    compile_reference: bool = False,
    layouts: bool = False,
    graphs: bool = False,
) -> dict:
    """Run the benchmark and return the result object (see the module docstring)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if graphs and device != "cuda":
        raise CatfastError(f"--graphs captures the fused step as a CUDA graph: it needs CUDA (this run is on {device})")
    against = check_names(against)
    precision, precision_why = resolve_mixed_precision(mixed_precision, device)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if precision == "bf16" and torch_dtype != torch.float32:
        raise CatfastError("--mixed-precision bf16 autocasts an fp32 UNet; use it with --dtype fp32")
    autocast = _autocast_factory(precision, device)
    unet, sched, batch_args, load_teacher = _setup(model, batch, rank, torch_dtype, device, seed, targets)
    names = [*MODES, *(LAYOUT_MODES if layouts else ()), *((GRAPHED,) if graphs else ()), *against]
    fns = _loss_fns(names, unet, sched, batch_args, load_teacher)
    results = {m: _measure_once(unet, fns[m][0], autocast, fns[m][2]) for m in names}
    if compile_reference:  # the CPU compile and SD1.5's on CUDA take minutes: asked for, not by default
        compiled = torch.compile(unet)
        names.append("reference_compiled")
        fns["reference_compiled"] = (lambda: cat_loss(compiled, sched, **batch_args, mode="reference"), (unet,),
                                     contextlib.nullcontext)  # fmt: skip
        results["reference_compiled"] = {}
    gemm_dtype = torch.bfloat16 if precision == "bf16" else torch_dtype
    gemm = [gemm_rate(gemm_dtype, device)]
    times, cpu_times, host_times, peaks = _time_interleaved(unet, fns, names, steps, autocast, device)
    gemm.append(gemm_rate(gemm_dtype, device))
    gemm_flops = statistics.mean(gemm)

    chosen, why = auto_mode(unet, device)
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": dtype,
        "mixed_precision": precision,
        "mixed_precision_reason": precision_why,
        "model": model,
        "batch": batch,
        "rank": rank,
        "targets": list(targets),
        "steps": steps,
        "latent": list(batch_args["latents"].shape[1:]),
        "torch": torch.__version__,
        "git": git_commit(),
        "gemm_flops": round(gemm_flops),
        "auto": {"mode": chosen, "reason": why},
        "modes": {},
        "against": {},
        "peak_method": (
            "cuda max_memory_allocated above the resident set, plus the entry's own weights"
            if device == "cuda"
            else "VmHWM of a fresh process per entry"
        ),
    }
    for m in names:
        entry = _entry(results[m], results["reference"], m, times[m], gemm_flops, _param_bytes(fns[m][1]), peaks[m])
        entry["median_cpu_ms"] = round(statistics.median(cpu_times[m]), 3)
        entry["host_ms"] = round(statistics.median(host_times[m]), 3)
        out["against" if m in CONTESTANTS else "modes"][m] = entry
    if memory and device != "cuda":
        spec = dict(
            model=model, batch=batch, rank=rank, dtype=dtype, seed=seed, targets=list(targets), precision=precision
        )
        for m in (n for n in names if n != "reference_compiled"):  # the child process runs uncompiled steps
            section = out["against" if m in CONTESTANTS else "modes"]
            peak, setup = _peak_rss(spec, m)
            section[m]["peak_bytes"], section[m]["peak_rss_setup_bytes"] = peak, setup
    fused, reference = out["modes"]["fused"], out["modes"]["reference"]
    out["parity"] = {"loss_rel_err": fused["loss_rel_err"], "grad_rel_err": fused["grad_rel_err"]}
    out["speedup"] = round(reference["median_ms"] / fused["median_ms"], 3)
    out["cpu_speedup"] = round(reference["median_cpu_ms"] / fused["median_cpu_ms"], 3)
    default_ms = out["modes"][chosen]["median_ms"]
    out["default_vs"] = {name: round(e["median_ms"] / default_ms, 3) for name, e in out["against"].items()}
    if "official" in out["against"]:  # what each entry issues per step against the three-call official step
        official = out["against"]["official"]
        out["launch_vs_official"] = {
            name: {"launch_ops": round(e["launch_ops"] / official["launch_ops"], 3),
                   "host_ms": round(e["host_ms"] / official["host_ms"], 3)}  # fmt: skip
            for name, e in out["modes"].items()
            if e.get("launch_ops") is not None
        }
    chosen_convs = list(conv_choices().values())
    out["conv_gemm"] = {"gemm": chosen_convs.count("gemm"), "timed": len(chosen_convs)}
    return out


def _time_interleaved(unet, fns: dict, names: list[str], steps: int, autocast, device: str):
    """Per entry, the wall, process-CPU and host-issue ms of each timed step (entries alternate step by step
    after one warm-up round, which also compiles; host-issue time stops before the device is waited for) and,
    on CUDA, the step's own peak: the allocator's peak above what was resident when it started (every entry's
    modules stay resident in this process), plus the entry's own weights."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {m: [] for m in names}
    cpu_times: dict[str, list[float]] = {m: [] for m in names}
    host_times: dict[str, list[float]] = {m: [] for m in names}
    peaks: dict[str, int | None] = {m: None for m in names}
    for i in range(steps + 1):
        for m in names:
            if device == "cuda":
                unet.zero_grad(set_to_none=True)
                sync()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            sync()
            with fns[m][2]():
                t0, c0 = time.perf_counter(), time.process_time()
                _step(unet, fns[m][0], autocast)
                issued = time.perf_counter()
                sync()
                done = time.perf_counter()
            if i:
                times[m].append((done - t0) * 1e3)
                host_times[m].append((issued - t0) * 1e3)
                cpu_times[m].append((time.process_time() - c0) * 1e3)
            if device == "cuda":
                peaks[m] = torch.cuda.max_memory_allocated() - resident + _param_bytes(fns[m][1])
    return times, cpu_times, host_times, peaks


def _entry(r: dict, ref: dict, name: str, times: list[float], gemm_flops: float, param_bytes: int, peak) -> dict:
    """One entry's figures (module docstring), with its parity against the reference step where it has one."""
    median = statistics.median(times)
    flops = (r["fwd_flops"] + r["bwd_flops"]) if r.get("fwd_flops") is not None else None
    entry = {
        "median_ms": round(median, 3),
        "fwd_flops": r.get("fwd_flops"),
        "bwd_flops": r.get("bwd_flops"),
        "achieved_flops": round(flops / (median / 1e3)) if flops else None,
        "gemm_fraction": round(flops / (median / 1e3) / gemm_flops, 4) if flops else None,
        "saved_bytes": r.get("saved_bytes"),
        "launch_ops": r.get("launch_ops"),
        "launch_ops_by_op": r.get("launch_ops_by_op"),
        "host_syncs": r.get("host_syncs"),
        "param_bytes": param_bytes,
        "peak_bytes": peak,
    }
    if "out" in r and name != "reference":
        factor = LOSS_FACTOR.get(name, 1.0)
        entry["loss_rel_err"] = max(
            rel_err(factor * r["out"].total.detach(), ref["out"].total.detach()),
            *(rel_err(getattr(r["out"], k).detach(), getattr(ref["out"], k).detach()) for k in ("ldm", "cat")),
        )
        entry["grad_rel_err"] = max(rel_err(factor * r["grads"][n], g) for n, g in ref["grads"].items())
    return entry


# ------------------------------------------------------------------------------- peak RSS, one process each


def _peak_rss(spec: dict, name: str) -> tuple[int | None, int | None]:
    """(VmHWM during two steps of ``name`` alone, RSS before them) from a fresh Python process; (None, None)
    where there is no /proc/self/clear_refs to reset the high-water mark (not Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None, None
    code = "import sys, json; from catfast.bench.train_step import _peak_child; _peak_child(json.loads(sys.argv[1]))"
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps({**spec, "name": name})],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        timeout=3600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"peak-memory child for {name} failed: {r.stderr.strip().splitlines()[-1:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return got["peak"], got["setup"]


def _vm(key: str) -> int | None:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _peak_child(spec: dict) -> None:
    """Child of `_peak_rss`: build, reset the RSS high-water mark, run two steps, print JSON."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    unet, sched, batch_args, load_teacher = _setup(
        spec["model"], spec["batch"], spec["rank"], torch_dtype, "cpu", spec["seed"], spec["targets"]
    )
    fn, _, context = _loss_fns([spec["name"]], unet, sched, batch_args, load_teacher)[spec["name"]]
    autocast = _autocast_factory(spec["precision"], "cpu")
    setup = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
        f.write("5")
    with context():
        for _ in range(2):
            _step(unet, fn, autocast)
    print(json.dumps({"peak": _vm("VmHWM"), "setup": setup}))
