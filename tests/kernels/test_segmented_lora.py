"""The segmented mixed-adapter LoRA of serving (catfast.ops.segmented; Triton kernels in the interpreter)
against the pure-torch reference: random B, mixed ranks zero-padded in one pool, several adapters with
weights on one segment, base-only rows untouched, 97 rows, odd in-features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catfast.ops.segmented import Segment, SegmentPlan, segmented_lora_conv2d_, segmented_lora_linear_
from catfast.reference.segmented import segmented_lora_conv2d_ref, segmented_lora_linear_ref

RANKS = (6, 3, 1, 4, 6)  # per slot; the pool's R is 6, smaller ranks zero-padded


def _pool(fan_in: int, out: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = max(RANKS)
    a = torch.zeros(len(RANKS), r, fan_in)
    b = torch.zeros(len(RANKS), out, r)
    for s, rank in enumerate(RANKS):
        a[s, :rank] = torch.randn(rank, fan_in, generator=g) * 0.3
        b[s, :, :rank] = torch.randn(out, rank, generator=g) * 0.3  # random B: a zero B would pass anything
    scales = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5])  # slot 3: an adapter that does not target this layer
    return a.to(dtype), b.to(dtype), scales


MIXED = [  # (start, stop, mix): base rows 0-9 and 60-70 untouched, one to three adapters, negative weights
    (10, 31, ((0, 1.0),)),
    (31, 32, ((1, 0.7), (2, -1.3))),
    (40, 60, ((4, 1.0), (0, 0.25), (3, 1.0))),
    (70, 97, ((2, 1.0),)),
]
UNIFORM = [(i * 8, i * 8 + 8, ((i % 5, 1.0 - 0.1 * i),) if i % 3 else ((i % 5, 0.5), (1, 1.0))) for i in range(12)]


def _plan(segments, rows):
    return SegmentPlan(rows, [Segment(s, e, m) for s, e, m in segments])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "shape, segments",
    [((97, 37), MIXED), ((97, 3, 37), MIXED), ((96, 2, 37), UNIFORM)],
    ids=["97-rows", "97x3-tokens", "uniform-bmm"],
)
def test_segmented_linear_matches_reference(backend, shape, segments):
    rows, fan_in, out = shape[0], shape[-1], 29
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    weight, bias = torch.randn(out, fan_in, generator=g), torch.randn(out, generator=g)
    a, b, scales = _pool(fan_in, out)
    plan = _plan(segments, rows)
    assert plan.uniform == (segments is UNIFORM)
    y = F.linear(x, weight, bias)
    base = y.clone()
    segmented_lora_linear_(y, x, a, b, scales, plan, backend=backend)
    want = segmented_lora_linear_ref(x, weight, bias, a, b, scales, segments)
    err = (y.double() - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), err
    covered = torch.zeros(rows, dtype=torch.bool)
    for s, e, _ in segments:
        covered[s:e] = True
    assert torch.equal(y[~covered], base[~covered])  # base-only rows: no LoRA work, bit-identical
    assert (y[covered] - base[covered]).abs().max() > 0.1  # and the LoRA term is really there


def test_segmented_linear_half_precision_within_twice_torch_error():
    from catfast.testing import assert_close_to_ref

    x = torch.randn(97, 3, 37)
    weight = torch.randn(29, 37)
    a, b, scales = _pool(37, 29)
    plan = _plan(MIXED, 97)
    ref32 = F.linear(x, weight)
    segmented_lora_linear_(ref32, x, a, b, scales, plan, backend="torch")
    low = F.linear(x.bfloat16(), weight.bfloat16())
    low_ref = low.clone()
    segmented_lora_linear_(low_ref, x.bfloat16(), a.bfloat16(), b.bfloat16(), scales, plan, backend="torch")
    segmented_lora_linear_(low, x.bfloat16(), a.bfloat16(), b.bfloat16(), scales, plan, backend="triton")
    assert_close_to_ref(low, ref32, low_ref, "bf16 triton segmented")


@pytest.mark.parametrize("segments", [MIXED, UNIFORM], ids=["mixed", "uniform-grouped"])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_segmented_conv_matches_reference(kernel, stride, padding, segments):
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(5, 7, kernel, stride=stride, padding=padding)
    x = torch.randn(97, 5, 6, 6, generator=g)
    a, b, scales = _pool(5 * kernel * kernel, 7)
    plan = _plan(segments, 97)
    with torch.no_grad():
        y = conv(x)
        base = y.clone()
        segmented_lora_conv2d_(y, x, conv, a, b, scales, plan)
        want = segmented_lora_conv2d_ref(x, conv, a, b, scales, segments)
    err = (y.double() - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), err
    untouched = [(96, 97)] if segments is UNIFORM else [(0, 10), (60, 70)]  # base-only rows
    assert all(torch.equal(y[s:e], base[s:e]) for s, e in untouched)


def test_segment_plan_refuses_bad_layouts():
    with pytest.raises(ValueError, match="overlap"):
        _plan([(0, 5, ((0, 1.0),)), (4, 6, ((1, 1.0),))], 10)
    with pytest.raises(ValueError, match="outside"):
        _plan([(5, 12, ((0, 1.0),))], 10)
    with pytest.raises(ValueError, match="negative slot"):
        _plan([(0, 2, ((-1, 1.0),))], 10)
    with pytest.raises(ValueError, match="rows"):
        segmented_lora_linear_(torch.zeros(3, 2), torch.zeros(3, 4), *_pool(4, 2), _plan(MIXED[:1], 97))
