"""fp16 and bf16 for every kernel and backend, against the reference computed in fp32 from the same
(already rounded) inputs, with flash-attention's rule: the kernel's error is at most twice the error of
the plain torch ops in the same precision, plus a small absolute floor (``catfast.testing.FLOOR``:
1e-3 fp16, 1e-2 bf16, about one unit in the last place at the O(1) magnitudes used here; it keeps a
case where torch's own error happens to be ~0, such as an all-base plan, from demanding bit equality
from a kernel that sums in another order). Random row plans as Punica's SGMV tests: uneven groups,
adapter slots nobody uses, all-base, one row; seeded.

On the CPU the Triton kernels run in the interpreter (tiny shapes keep it quick); the same tests run on
CUDA with the real Triton compiler when a GPU is present (``-m cuda``; skipped, and reported as such by
pytest -ra, where there is none: CI counts them as not run)."""

import os
import random

import pytest
import torch
import torch.nn.functional as F

from catfast.ops.lora import lora_linear
from catfast.ops.lora_conv import lora_conv2d
from catfast.ops.merge import merge_lora_
from catfast.ops.segmented import Segment, SegmentPlan, segmented_lora_conv2d_, segmented_lora_linear_
from catfast.reference.lora import lora_conv2d_ref, lora_linear_ref
from catfast.reference.merge import merge_lora_ref_
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import assert_close_to_ref

HALF = [torch.float16, torch.bfloat16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU (benchmarks/gpu.sh)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
# Triton on CPU tensors is the interpreter, which tests/conftest.py turns on only where there is no GPU
TRITON_CPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="no interpreter: cuda variant runs")
BACKEND_DEVICES = [
    ("torch", "cpu"),
    pytest.param("triton", "cpu", marks=TRITON_CPU),
    pytest.param("torch", "cuda", marks=[pytest.mark.cuda, CUDA]),
    pytest.param("triton", "cuda", marks=[pytest.mark.cuda, CUDA]),
]
S = 3  # adapter slots of every layer


def row_plans(seed: int = 0):
    """(name, slots, needs_grad): one row, all-base, a slot nobody uses, the CAT layout, and random
    uneven groups (Punica-style: each sample's slot drawn with unequal weights, base rows included)."""
    rng = random.Random(seed)
    plans = [
        ("one-row", [rng.randrange(S)], [True]),
        ("all-base", [NO_ADAPTER] * 3, [True, False, True]),
        ("unused-slot", [0, 2, 2, 0, NO_ADAPTER], [True, False, True, True, False]),  # slot 1 empty
        ("cat-layout", [1, 1, NO_ADAPTER], [True, True, False]),
    ]
    for i in range(2):
        n = rng.randint(3, 6)
        slots = rng.choices([NO_ADAPTER, 0, 1, 2], weights=[1, 4, 2, 1], k=n)
        plans.append((f"random{i}", slots, [rng.random() < 0.6 for _ in range(n)]))
    return plans


PLANS = row_plans()


def _linear_inputs(slots, grad, dtype, device, rows=4, din=24, dout=20, r=4):
    g = torch.Generator().manual_seed(len(slots))
    x = torch.randn(len(slots), rows, din, generator=g)
    w = torch.randn(dout, din, generator=g) / din**0.5
    bias = torch.randn(dout, generator=g)
    a = torch.randn(S, r, din, generator=g) / din**0.5
    b = torch.randn(S, dout, r, generator=g)  # random B: zero passes any test
    low = [t.to(device=device, dtype=dtype) for t in (x, w, bias, a, b)]
    plan = RowPlan.build(slots, [0.5 + 0.25 * i for i in range(len(slots))], grad, device=device)
    return low, plan


def _linear_grads(fn, x, w, bias, a, b, plan, dy):
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y = fn(x, w, bias, a, b, plan)
    keep = plan.needs_grad.to(y.dtype).view(-1, 1, 1)  # row-aware: only the grad samples contribute
    (y * dy.to(y.dtype) * keep).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name, slots, grad", PLANS, ids=[p[0] for p in PLANS])
def test_lora_linear_half(name, slots, grad, dtype, backend, device):
    (x, w, bias, a, b), plan = _linear_inputs(slots, grad, dtype, device)
    dy = torch.randn(x.shape[0], x.shape[1], w.shape[0], generator=torch.Generator().manual_seed(9)).to(device)
    got = _linear_grads(lambda *t: lora_linear(*t, backend=backend), x, w, bias, a, b, plan, dy)
    ref32 = _linear_grads(lora_linear_ref, *(t.float() for t in (x, w, bias, a, b)), plan, dy)
    torch_low = _linear_grads(lora_linear_ref, x, w, bias, a, b, plan, dy)
    for what, out, want, base in zip(("y", "dx", "da", "db"), got, ref32, torch_low):
        assert out.dtype == dtype
        assert_close_to_ref(out, want, base, f"{name} {backend} {dtype} {what}")
    if any(s != NO_ADAPTER for s in slots):
        assert (got[0].float() - F.linear(x, w, bias).float()).abs().max() > 0.05  # the LoRA term is there


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name, slots, grad", PLANS[1:4], ids=[p[0] for p in PLANS[1:4]])
def test_lora_conv2d_half(name, slots, grad, dtype, device):
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) / 6)
    base = base.to(device=device, dtype=dtype)
    x = torch.randn(len(slots), 4, 7, 6, generator=g).to(device=device, dtype=dtype)
    a = (torch.randn(S, 2, 4, 3, 3, generator=g) / 6).to(device=device, dtype=dtype)
    b = torch.randn(S, 6, 2, generator=g).to(device=device, dtype=dtype)
    plan = RowPlan.build(slots, [0.5 + 0.25 * i for i in range(len(slots))], grad, device=device)
    dy = torch.randn(len(slots), 6, 4, 3, generator=g).to(device)

    def ref(x, w, bias, a, b, plan):
        return lora_conv2d_ref(x, w, bias, a, b, plan, stride=2, padding=1)

    got = _conv_grads(lambda x, w, bias, a, b, plan: lora_conv2d(x, base, a, b, plan), x, base, a, b, plan, dy)
    ref32 = _conv_grads(ref, x.float(), None, a.float(), b.float(), plan, dy,
                        weights=(base.weight.float(), base.bias.float()))  # fmt: skip
    torch_low = _conv_grads(ref, x, None, a, b, plan, dy, weights=(base.weight, base.bias))
    for what, out, want, low in zip(("y", "dx", "da", "db"), got, ref32, torch_low):
        if want is None:  # an all-base plan: no slot is used, neither reaches A or B
            assert out is None, what
            continue
        assert_close_to_ref(out, want, low, f"conv {name} {dtype} {what}")


def _conv_grads(fn, x, base, a, b, plan, dy, weights=None):
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    w, bias = weights if weights is not None else (base.weight, base.bias)
    y = fn(x, w, bias, a, b, plan)
    (y * dy.to(y.dtype) * plan.needs_grad.to(y.dtype).view(-1, 1, 1, 1)).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


def segment_plans(seed: int = 0):
    """(name, rows, segments): uneven segments with base-only gaps, mixes of 1-2 adapters, a slot nobody
    uses, one row, all-base (no segment), and equal back-to-back segments (the batched path)."""
    rng = random.Random(seed)
    plans = [
        ("one-row", 1, [(0, 1, ((2, 1.0),))]),
        ("all-base", 4, []),
        ("uniform", 6, [(0, 2, ((0, 1.0),)), (2, 4, ((2, 0.5), (0, 0.5))), (4, 6, ((0, -1.0),))]),
    ]
    rows, segs, start = 9, [], 0
    while start < rows:
        stop = min(rows, start + rng.randint(1, 3))
        if rng.random() < 0.7:  # else a gap: base-only rows
            mix = tuple((rng.choice([0, 2]), round(rng.uniform(-1, 1.5), 2)) for _ in range(rng.randint(1, 2)))
            segs.append((start, stop, mix))
        start = stop
    plans.append(("random-uneven", rows, segs))
    return plans


SEGMENTS = segment_plans()


def _segmented_low(x, w, a, b, scales, segments):
    """The plain torch ops in x's dtype: the 'torch op in the same precision' of the segmented rule."""
    y = F.linear(x, w)
    for start, stop, mix in segments:
        for slot, weight in mix:
            y[start:stop] += (weight * scales[slot]).to(x.dtype) * ((x[start:stop] @ a[slot].T) @ b[slot].T)
    return y


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name, rows, segments", SEGMENTS, ids=[p[0] for p in SEGMENTS])
def test_segmented_linear_half(name, rows, segments, dtype, backend, device):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 3, 24, generator=g), torch.randn(20, 24, generator=g) / 24**0.5
    a, b = torch.randn(S, 4, 24, generator=g) / 24**0.5, torch.randn(S, 20, 4, generator=g)
    scales = torch.tensor([0.5, 2.0, 1.25])
    x, w, a, b = (t.to(device=device, dtype=dtype) for t in (x, w, a, b))
    scales = scales.to(device)
    plan = SegmentPlan(rows, [Segment(*s) for s in segments], device=device)
    y = F.linear(x, w)
    segmented_lora_linear_(y, x, a, b, scales, plan, backend=backend)
    ref32 = _segmented_low(x.float(), w.float(), a.float(), b.float(), scales, segments)
    assert_close_to_ref(y, ref32, _segmented_low(x, w, a, b, scales, segments), f"{name} {backend} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name, rows, segments", SEGMENTS, ids=[p[0] for p in SEGMENTS])
def test_segmented_conv2d_half(name, rows, segments, dtype, device):
    g = torch.Generator().manual_seed(rows)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / 6)
    conv = conv.to(device=device, dtype=dtype)
    x = torch.randn(rows, 4, 5, 5, generator=g).to(device=device, dtype=dtype)
    a = (torch.randn(S, 2, 36, generator=g) / 6).to(device=device, dtype=dtype)
    b = torch.randn(S, 6, 2, generator=g).to(device=device, dtype=dtype)
    scales = torch.tensor([0.5, 2.0, 1.25], device=device)
    plan = SegmentPlan(rows, [Segment(*s) for s in segments], device=device)
    with torch.no_grad():
        y = conv(x)
        segmented_lora_conv2d_(y, x, conv, a, b, scales, plan)

        def plain(x, w, a, b):
            out = F.conv2d(x, w, padding=1)
            for start, stop, mix in segments:
                for slot, weight in mix:
                    low = F.conv2d(x[start:stop], a[slot].view(2, 4, 3, 3), padding=1)
                    out[start:stop] += (weight * scales[slot]).to(x.dtype) * F.conv2d(low, b[slot][:, :, None, None])
            return out

        ref32 = plain(x.float(), conv.weight.float(), a.float(), b.float())
        assert_close_to_ref(y, ref32, plain(x, conv.weight, a, b), f"conv {name} {dtype}")


@pytest.mark.parametrize(
    "backend, device", [("ext", "cpu"), ("torch", "cpu"), pytest.param("torch", "cuda", marks=[pytest.mark.cuda, CUDA])]
)  # the extension's merge is CPU-only here (its CUDA twin is the other half of issue 16)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merge_half(dtype, backend, device, monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", backend)
    g = torch.Generator().manual_seed(4)
    shapes = [((16, 12), (3, 12), (16, 3)), ((6, 4, 3, 3), (2, 4, 3, 3), (6, 2, 1, 1))]
    ws = [torch.randn(s[0], generator=g).to(device=device, dtype=dtype) for s in shapes]
    downs = [torch.randn(s[1], generator=g).to(device=device, dtype=dtype) for s in shapes]
    ups = [torch.randn(s[2], generator=g).to(device=device, dtype=dtype) for s in shapes]
    scales = [0.75, -1.5]
    got = [w.clone() for w in ws]
    merge_lora_(got, downs, ups, scales)
    ref32 = [w.float() for w in ws]
    merge_lora_ref_(ref32, [d.float() for d in downs], [u.float() for u in ups], scales)
    for i, (w, d, u, s) in enumerate(zip(ws, downs, ups, scales)):
        plain = w + s * (u.reshape(u.shape[0], -1) @ d.reshape(d.shape[0], -1)).view(w.shape)  # in dtype
        assert_close_to_ref(got[i], ref32[i], plain, f"merge {backend} {dtype} layer {i}")
        assert (got[i].float() - w.float()).abs().max() > 0.1
