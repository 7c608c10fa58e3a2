"""What a better attention core would give the small UNet: an AVX-512 kernel written for head sizes 8 and 16
(attention_small_heads.cpp: keys and values transposed once per head, one pass over the keys per query row
for scores, exps and P V, key blocks kept in L1) against torch's CPU flash attention, on the small UNet's
attention shapes (3 rows: the fused CAT step at batch 1). Forward and backward timed interleaved, medians;
errors of both against fp64.

  OMP_NUM_THREADS=1 python benchmarks/attention_small_heads.py \
      --out benchmarks/results/attention-small-heads-cpu-dev-2core.jsonl

Builds the kernel with torch.utils.cpp_extension (a C++ compiler; ~30 s); needs a CPU with AVX-512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
# (batch, heads, queries, keys, head size): the small UNet's self- and cross-attention per level
SHAPES = [(3, 8, 1024, 1024, 8), (3, 8, 1024, 77, 8), (3, 8, 256, 256, 16), (3, 8, 256, 77, 16)]


def _build():
    build_dir = tempfile.mkdtemp(prefix="catfast-attn-")
    flags = ["-O3", "-DNDEBUG", "-fopenmp"]
    src = os.path.join(HERE, "attention_small_heads.cpp")
    return load(
        "attention_small_heads", [src], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=build_dir
    )


def _kernel_attention(ext):
    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            scale = q.shape[-1] ** -0.5
            out, lse = ext.forward(q, k, v, scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            return tuple(ext.backward(grad, q, k, v, out, lse, ctx.scale))

    return Attention.apply


def _inputs(b, h, s, keys, d):
    g = torch.Generator().manual_seed(0)

    def heads_view(n):  # diffusers' layout: (B, N, H, D) viewed as (B, H, N, D)
        return torch.randn(b, n, h, d, generator=g).transpose(1, 2).requires_grad_()

    return heads_view(s), heads_view(keys), heads_view(keys), torch.randn(b, h, s, d, generator=g)


def _run(fn, q, k, v, grad):
    for t in (q, k, v):
        t.grad = None
    t0 = time.perf_counter()
    out = fn(q, k, v)
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return out.detach(), [t.grad.clone() for t in (q, k, v)], (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def measure(attention, shape, rounds):
    q, k, v, grad = _inputs(*shape)
    exact = _run(lambda *t: F.scaled_dot_product_attention(*(x.double() for x in t)), q, k, v, grad.double())
    contestants = {"torch": F.scaled_dot_product_attention, "kernel": attention}
    times = {name: ([], []) for name in contestants}
    errors = {}
    for name, fn in contestants.items():
        out, grads, _, _ = _run(fn, q, k, v, grad)
        errors[name] = (_err(out, exact[0]), max(_err(a, b) for a, b in zip(grads, exact[1])))
    for _ in range(rounds):
        for name, fn in contestants.items():
            _, _, fwd, bwd = _run(fn, q, k, v, grad)
            times[name][0].append(fwd)
            times[name][1].append(bwd)
    b, h, s, keys, d = shape
    flops = 4 * b * h * s * keys * d  # forward: QK^T and PV; backward counted as 2.5x (recompute + 4 products)
    r = {"shape": list(shape), "threads": torch.get_num_threads()}
    for name in contestants:
        fwd, bwd = statistics.median(times[name][0]), statistics.median(times[name][1])
        r[name] = {
            "forward_ms": round(fwd, 3),
            "backward_ms": round(bwd, 3),
            "forward_gflops": round(flops / fwd / 1e6, 1),
            "backward_gflops": round(2.5 * flops / bwd / 1e6, 1),
            "out_rel_err": errors[name][0],
            "grad_rel_err": errors[name][1],
        }
    r["speedup"] = round(
        (r["torch"]["forward_ms"] + r["torch"]["backward_ms"])
        / (r["kernel"]["forward_ms"] + r["kernel"]["backward_ms"]),
        2,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON-lines file to append to")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    ext = _build()
    if not ext.supported(8):
        raise SystemExit("this CPU has no AVX-512: the kernel does not run here")
    attention = _kernel_attention(ext)
    print(
        f"| (B, H, queries, keys, D), {torch.get_num_threads()} thread(s) "
        "| torch fwd + bwd ms | kernel fwd + bwd ms | x | err torch / kernel |"
    )
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        r = measure(attention, shape, args.rounds)
        t, c = r["torch"], r["kernel"]
        print(
            f"| {tuple(shape)} | {t['forward_ms']:.1f} + {t['backward_ms']:.1f} | {c['forward_ms']:.1f} + "
            f"{c['backward_ms']:.1f} | {r['speedup']:.2f} | {t['grad_rel_err']:.0e} / {c['grad_rel_err']:.0e} |",
            flush=True,
        )
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
