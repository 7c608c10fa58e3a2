"""``catfast bench ops``: each native op against torch (and Triton where it exists), interleaved in one
process on one device, with the achieved rate next to every time.

Entries (shapes of SD1.5 at 512 px; ``smoke=True``: tiny shapes for the test suite):
- merge / swap: the multi-layer LoRA merge and the one-pass adapter swap; GB/s counts W read and written
  once (the least any merge moves), contestants: the extension, torch's reference (fp32 accumulate, one
  rounding) and what a torch user writes (``W += s * B @ A`` per layer; unmerge then merge for a swap).
- group_norm_silu: forward and forward + backward, GB/s over the least traffic (x read, y written; plus
  dy read and dx written), against ``F.silu(F.group_norm(x))``; and the row-aware backward on the fused
  CAT layout (a third of the samples without gradient) against torch's full backward.
- cat_loss: forward + backward in ms against the reference loss under autograd.
- lora_gemm: catfast's row-planned LoRA linear (torch backend, and Triton on CUDA) in achieved FLOP/s
  against the plain GEMM of the same shape (``x @ W^T``), whose rate is the ceiling.
Times are medians over ``reps`` rounds; in each round every contestant runs once, in turn. On the CPU each
contestant also gets ``cpu_ms``, the process CPU time of the call: on a machine that other processes keep
busy it moves far less than the wall time (measured on the shared 2-core dev machine: the wall time of one
GroupNorm+SiLU forward ranged 1.9-5.9 ms over three runs, its CPU time 2.0-2.1 ms).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from catfast import backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_ops(
    *,
    device: str | None = None,
    smoke: bool = False,
    reps: int = 5,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run every entry and return one JSON-ready dict (see the module docstring)."""
    from catfast.env import has_ext

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    log = log or (lambda s: None)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "extension": has_ext().detail,
        "commit": _git(),
        "smoke": smoke,
        "reps": reps,
        "note": "median of interleaved rounds in one process; on a shared machine other processes add noise",
    }
    for name, fn in (("merge", _merge), ("group_norm_silu", _group_norm_silu), ("cat_loss", _cat_loss),
                     ("lora_gemm", _lora_gemm)):  # fmt: skip
        result[name] = []
        for dt in dtypes:
            for entry in fn(dev, DTYPES[dt], smoke, reps):
                entry["dtype"] = dt
                result[name].append(entry)
                log(_line(name, entry))
    return result


def _git() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


def _line(name: str, entry: dict) -> str:
    rates = ", ".join(
        f"{k} {v['ms']:.3f} ms {v['rate']:.3g} {entry['unit']}"
        + (f" (cpu {v['cpu_ms']:.3f} ms)" if "cpu_ms" in v else "")
        for k, v in entry["contestants"].items()
    )
    speed = f"; ext {entry['ext_speedup']}x" if "ext_speedup" in entry else ""
    speed += f" ({entry['ext_speedup_cpu_time']}x in CPU time)" if "ext_speedup_cpu_time" in entry else ""
    return f"{name} {entry['what']} {entry['dtype']}: {rates}{speed}"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Times(dict):
    """Median wall ms per contestant (the dict), and ``cpu``: median process CPU ms (CPU device only)."""

    cpu: dict[str, float] | None = None


def _interleaved(dev: torch.device, fns: dict[str, Callable[[], object]], reps: int) -> _Times:
    """Median ms of each function, one call of each per round (after one warm-up round)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(reps + 1):
        for k, fn in fns.items():
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(dev)
            if round_:
                wall[k].append((time.perf_counter() - t0) * 1e3)
                cpu[k].append((time.process_time() - c0) * 1e3)
    out = _Times({k: statistics.median(v) for k, v in wall.items()})
    out.cpu = {k: statistics.median(v) for k, v in cpu.items()} if dev.type == "cpu" else None
    return out


def _entry(what: str, unit: str, ms: _Times, work: float, baseline: str = "torch") -> dict:
    """``work``: bytes (GB/s) or FLOPs (GFLOP/s) per call; rate = work / wall time."""
    contestants = {k: {"ms": round(v, 4), "rate": round(work / (v * 1e-3) / 1e9, 3)} for k, v in ms.items()}
    if ms.cpu is not None:
        for k, v in ms.cpu.items():
            contestants[k]["cpu_ms"] = round(v, 4)
    entry = {"what": what, "unit": unit, "contestants": contestants}
    if "ext" in ms and baseline in ms:
        entry["ext_speedup"] = round(ms[baseline] / ms["ext"], 3)
        if ms.cpu is not None and ms.cpu["ext"] > 0:
            entry["ext_speedup_cpu_time"] = round(ms.cpu[baseline] / ms.cpu["ext"], 3)
    return entry


def _ext_can(op: str, dev, dtype, reasons: list[str]) -> bool:
    """Whether the extension runs ``op`` here: the registry's probe (built at all, with CUDA for CUDA
    tensors, the dtype) and the op's per-call ``reasons``."""
    return not backends.reasons(op, dev, dtype, why_not={"ext": reasons})["ext"]


# ---- merge / swap ---------------------------------------------------------------------------------


def _merge(dev, dtype, smoke, reps):
    from catfast.ops import merge as merge_ops
    from catfast.reference.merge import merge_lora_ref_, swap_lora_ref_

    # SD1.5 attention projections (q, k, v, out) of the three widths, 4 blocks each, rank 16
    widths = [(64, 4)] if smoke else [(320, 16), (640, 16), (1280, 16)]
    per_width = 2 if smoke else 16
    g = torch.Generator().manual_seed(0)
    weights, a1, b1, a2, b2 = [], [], [], [], []
    for width, rank in widths:
        for _ in range(per_width):
            weights.append(torch.randn(width, width, generator=g).to(dtype).to(dev))
            for a, b in ((a1, b1), (a2, b2)):
                a.append((torch.randn(rank, width, generator=g) / width**0.5).to(dev))
                b.append(torch.randn(width, rank, generator=g).to(dev))
    scales = [0.5] * len(weights)
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    shape = f"{len(weights)} layers {'+'.join(str(w) for w, _ in widths)} rank {widths[0][1]}"
    ext_ok = _ext_can("merge_lora", dev, dtype, merge_ops.ext_not_supported_reasons(weights, a1, b1))

    def naive(a, b, s):
        def run():
            with torch.no_grad():
                for w, x, y in zip(weights, a, b):
                    w += s * (y.to(w.dtype) @ x.to(w.dtype))

        return run

    merge = {"torch": lambda: merge_lora_ref_(weights, a1, b1, scales), "torch_naive": naive(a1, b1, 0.5)}
    if ext_ok:
        merge["ext"] = lambda: _forced("ext", merge_ops.merge_lora_, weights, a1, b1, scales)
    out = [_entry(f"merge {shape}", "GB/s", _interleaved(dev, merge, reps), 2 * w_bytes)]

    def naive_swap():
        naive(a1, b1, -0.5)()
        naive(a2, b2, 0.5)()

    swap = {"torch": lambda: swap_lora_ref_(weights, a1, b1, scales, a2, b2, scales), "torch_naive": naive_swap}
    if ext_ok:
        swap["ext"] = lambda: _forced("ext", merge_ops.swap_lora_, weights, a1, b1, scales, a2, b2, scales)
        swap["ext_unmerge_merge"] = lambda: (
            _forced("ext", merge_ops.unmerge_lora_, weights, a1, b1, scales),
            _forced("ext", merge_ops.merge_lora_, weights, a2, b2, scales),
        )
    out.append(_entry(f"swap {shape}", "GB/s", _interleaved(dev, swap, reps), 2 * w_bytes))
    return out


def _forced(backend: str, fn, *args, **kwargs):
    old = os.environ.get("CATFAST_BACKEND")
    os.environ["CATFAST_BACKEND"] = backend
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            os.environ.pop("CATFAST_BACKEND", None)
        else:
            os.environ["CATFAST_BACKEND"] = old


# ---- GroupNorm + SiLU -------------------------------------------------------------------------------


def _group_norm_silu(dev, dtype, smoke, reps):
    from catfast.ops import groupnorm_silu as gn_ops

    # the ResNet norms of SD1.5 at 512 px, batch 2 (a CAT step at B=1 without its teacher rows), 32 groups
    shapes = [(2, 32, 8, 8)] if smoke else [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
    out = []
    for shape in shapes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=g).to(dtype).to(dev)
        w, b = (torch.randn(shape[1], generator=g).to(dtype).to(dev) for _ in range(2))
        dy = torch.randn(shape, generator=g).to(dtype).to(dev)
        xg = x.clone().requires_grad_(True)
        nbytes = x.numel() * x.element_size()
        ext_ok = _ext_can("group_norm_silu", dev, dtype, gn_ops.ext_not_supported_reasons(x))
        fwd = {"torch": lambda: F.silu(F.group_norm(x, 32, w, b))}
        both = {"torch": lambda: F.silu(F.group_norm(xg, 32, w, b)).backward(dy)}
        if ext_ok:
            fwd["ext"] = lambda: _forced("ext", gn_ops.group_norm_silu, x, 32, w, b)
            both["ext"] = lambda: _forced("ext", gn_ops.group_norm_silu, xg, 32, w, b).backward(dy)
        with torch.no_grad():
            out.append(_entry(f"forward {tuple(shape)}", "GB/s", _interleaved(dev, fwd, reps), 2 * nbytes))
        out.append(_entry(f"forward+backward {tuple(shape)}", "GB/s", _interleaved(dev, both, reps), 5 * nbytes))
        # the fused CAT layout: 3 samples, the teacher's without gradient (its dy is zero)
        x3 = torch.cat([x[:1]] * 3).requires_grad_(True)
        dy3 = torch.cat([dy[:1]] * 2 + [torch.zeros_like(dy[:1])])
        rows = {"torch": lambda: F.silu(F.group_norm(x3, 32, w, b)).backward(dy3)}
        if ext_ok:
            rows["ext"] = lambda: _forced(
                "ext", gn_ops.group_norm_silu, x3, 32, w, b, grad_samples=[True, True, False]
            ).backward(dy3)
        shape3 = (3, *shape[1:])
        out.append(
            _entry(
                f"forward+row-aware backward {shape3} (2 of 3 rows)",
                "GB/s",
                _interleaved(dev, rows, reps),
                5 * nbytes * 3 // 2,
            )
        )
    return out


# ---- CAT loss -------------------------------------------------------------------------------------------


def _cat_loss(dev, dtype, smoke, reps):
    from catfast.ops import cat_loss as loss_ops
    from catfast.reference.cat_loss import cat_loss_ref

    out = []
    for batch in (2,) if smoke else (1, 4):
        shape = (batch, 4, 8, 8) if smoke else (batch, 4, 64, 64)  # SD1.5 latents at 512 px
        g = torch.Generator().manual_seed(2)
        pred, stripped = (torch.randn(shape, generator=g).to(dtype).to(dev).requires_grad_(True) for _ in range(2))
        target, teacher = (torch.randn(shape, generator=g).to(dev) for _ in range(2))
        weights = (torch.rand(batch, generator=g) + 0.5).to(dev)  # min-SNR weights
        fns = {"torch": lambda: cat_loss_ref(pred, target, stripped, teacher, weights, 1.0)[0].backward()}
        if _ext_can("cat_loss", dev, dtype, loss_ops.ext_not_supported_reasons([pred, target])):
            fns["ext"] = lambda: _forced(
                "ext", loss_ops.fused_cat_loss, pred, target, stripped, teacher, weights=weights
            ).total.backward()
        # least traffic: both predictions and both fp32 targets read, both gradients written
        nbytes = pred.numel() * (4 * pred.element_size() + 2 * 4)
        out.append(_entry(f"forward+backward {shape}, both terms", "GB/s", _interleaved(dev, fns, reps), nbytes))
    return out


# ---- LoRA GEMM --------------------------------------------------------------------------------------


def _lora_gemm(dev, dtype, smoke, reps):
    from catfast.backends import reasons
    from catfast.ops.lora import lora_linear
    from catfast.rows import RowPlan

    # (samples, rows per sample, in, out, rank): SD1.5 attention projections at 512 px, batch 2
    shapes = [(2, 64, 32, 32, 4)] if smoke else [(2, 4096, 320, 320, 16), (2, 1024, 640, 640, 16),
                                                  (2, 256, 1280, 1280, 16)]  # fmt: skip
    out = []
    for n, rows, fin, fout, rank in shapes:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(n, rows, fin, generator=g).to(dtype).to(dev)
        w = (torch.randn(fout, fin, generator=g) / fin**0.5).to(dtype).to(dev)
        a = (torch.randn(1, rank, fin, generator=g) / fin**0.5).to(dtype).to(dev)
        b = torch.randn(1, fout, rank, generator=g).to(dtype).to(dev)
        plan = RowPlan.build([0] * n, device=dev)
        m = n * rows
        fns = {
            "plain_gemm": lambda: x @ w.t(),
            "torch": lambda: lora_linear(x, w, None, a, b, plan, backend="torch"),
        }
        if dev.type == "cuda" and not reasons("lora_linear", dev, dtype)["triton"]:
            fns["triton"] = lambda: lora_linear(x, w, None, a, b, plan, backend="triton")
        with torch.no_grad():
            ms = _interleaved(dev, fns, reps)
        gemm_flops, lora_flops = 2 * m * fin * fout, 2 * m * (fin * fout + rank * (fin + fout))
        flops = {k: gemm_flops if k == "plain_gemm" else lora_flops for k in ms}
        entry = _entry(f"forward {m}x{fin}->{fout} rank {rank}", "GFLOP/s", ms, 0.0, baseline="plain_gemm")
        for k, v in entry["contestants"].items():
            v["rate"] = round(flops[k] / (ms[k] * 1e-3) / 1e9, 3)
        entry["of_plain_gemm_rate"] = {
            k: round(v["rate"] / entry["contestants"]["plain_gemm"]["rate"], 3) for k, v in entry["contestants"].items()
        }
        out.append(entry)
    return out
