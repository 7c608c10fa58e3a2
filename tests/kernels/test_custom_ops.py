"""The catfast:: custom ops (catfast/ops/library.py; catfast::lora_linear in catfast/ops/lora.py):
torch.library.opcheck on each (schema, fake implementation, autograd registration, AOT dispatch), and their
results against the references."""

import os

import pytest
import torch
from torch.library import opcheck

import catfast.ops.library as lib
import catfast.ops.lora  # noqa: F401  registers catfast::lora_linear
from catfast.kernels.segmented_lora import plan_tiles
from catfast.ops.segmented import Segment, SegmentPlan
from catfast.reference.lora import lora_linear_ref
from catfast.reference.merge import merge_lora_ref_
from catfast.reference.segmented import segmented_lora_linear_ref
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import assert_rel_close

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU")]
TRITON_CPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="no interpreter: cuda variant runs")
DEVICES = [pytest.param("cpu", marks=TRITON_CPU), pytest.param("cuda", marks=CUDA)]  # for the Triton ops
OPS = ("lora_gemm", "segment_outer", "lora_linear", "segmented_lora_linear_", "merge_lora_")


def _linear(slots, grad, rows=5, din=20, dout=17, r=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = max(max(slots) + 1, 1)
    x = torch.randn(len(slots), rows, din, generator=g)
    w, bias = torch.randn(dout, din, generator=g) / din**0.5, torch.randn(dout, generator=g)
    a, b = torch.randn(s, r, din, generator=g), torch.randn(s, dout, r, generator=g)  # B random: never vacuous
    scales = [0.5 + i for i in range(len(slots))]
    x, w, bias, a, b = (t.to(device) for t in (x, w, bias, a, b))
    return x, w, bias, a, b, RowPlan.build(slots, scales, grad, device=device)


def test_every_op_is_registered_under_catfast():
    for name in OPS:
        assert hasattr(torch.ops.catfast, name), name


@pytest.mark.parametrize("device", DEVICES)
def test_lora_gemm_opcheck_and_value(device):
    x, w, bias, a, b, plan = _linear([0, NO_ADAPTER, 1, 0], [True] * 4, device=device)
    x2 = x.reshape(-1, x.shape[-1])
    args = (x2, w, bias, a, b, plan.slots, plan.scales, 5, True)
    opcheck(torch.ops.catfast.lora_gemm.default, args)
    y, low = torch.ops.catfast.lora_gemm(*args)
    assert_rel_close(y.view(4, 5, -1), lora_linear_ref(x, w, bias, a, b, plan), 1e-5, "lora_gemm")
    assert low.shape == (20, 3) and low.dtype == torch.float32
    opcheck(torch.ops.catfast.lora_gemm.default, (x2, w, None, a, b, plan.slots, plan.scales, 5, False))


@pytest.mark.parametrize("device", DEVICES)
def test_segment_outer_opcheck_and_value(device):
    g = torch.Generator().manual_seed(1)
    lhs, rhs, scale = torch.randn(30, 4, generator=g), torch.randn(30, 20, generator=g), torch.rand(30, generator=g)
    lhs, rhs, scale = lhs.to(device), rhs.to(device), scale.to(device)
    seg = torch.tensor([0, 0, 12, 30], device=device)  # an empty segment first
    opcheck(torch.ops.catfast.segment_outer.default, (lhs, rhs, scale, seg))
    want = torch.stack([(scale[s:e, None] * lhs[s:e]).t() @ rhs[s:e] for s, e in ((0, 0), (0, 12), (12, 30))])
    assert_rel_close(torch.ops.catfast.segment_outer(lhs, rhs, scale, seg), want, 1e-5, "segment_outer")


@pytest.mark.parametrize(
    "backend, device",
    [("torch", "cpu"), pytest.param("triton", "cpu", marks=TRITON_CPU), pytest.param("triton", "cuda", marks=CUDA)],
)
@pytest.mark.parametrize(
    "slots, grad",
    [([0, 0, NO_ADAPTER], [True, True, False]), ([1, NO_ADAPTER, 0, 1], [False, True, True, False])],
    ids=["cat-layout", "scattered-two-slots"],
)
def test_lora_linear_opcheck_and_gradients(backend, device, slots, grad):
    x, w, bias, a, b, plan = _linear(slots, grad, device=device)
    flat = lib.flatten_plan(plan)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    opcheck(torch.ops.catfast.lora_linear.default, (x, w, bias, a, b, *flat, backend))
    y = torch.ops.catfast.lora_linear(x, w, bias, a, b, *flat, backend)
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    want = lora_linear_ref(xr, w, bias, ar, br, plan)
    assert_rel_close(y, want, 1e-5, "y")
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    keep = torch.tensor(grad, dtype=torch.float32, device=device).view(-1, 1, 1)  # the reference's row-aware gradient:
    (want * dy * keep).sum().backward()  # only the grad samples contribute
    for name, got, ref in (("dx", x.grad, xr.grad), ("da", a.grad, ar.grad), ("db", b.grad, br.grad)):
        assert ref.abs().sum() > 0
        assert_rel_close(got, ref, 1e-5, name)


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_lora_linear_opcheck_and_value(device):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 3, 16, generator=g), torch.randn(12, 16, generator=g)
    a, b, scales = torch.randn(3, 4, 16, generator=g), torch.randn(3, 12, 4, generator=g), torch.rand(3, generator=g)
    x, w, a, b, scales = (t.to(device) for t in (x, w, a, b, scales))
    segments = [(0, 2, ((1, 1.0),)), (3, 6, ((0, 0.5), (2, -1.0)))]  # row 2 is base-only
    plan = SegmentPlan(6, [Segment(*s) for s in segments], device=device)
    coef = plan.coefficients(scales)
    y = torch.nn.functional.linear(x, w)
    args = (y, x, a, b, coef, plan.slots.to(torch.int32), *plan_tiles(plan, x))
    opcheck(torch.ops.catfast.segmented_lora_linear_.default, args)
    y = torch.nn.functional.linear(x, w)
    torch.ops.catfast.segmented_lora_linear_(y, *args[1:])
    assert_rel_close(y, segmented_lora_linear_ref(x, w, None, a, b, scales, segments), 1e-5, "segmented")


def test_merge_lora_opcheck_and_value():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(8, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g)]
    downs = [torch.randn(2, 6, generator=g), torch.randn(3, 4, 3, 3, generator=g)]
    ups = [torch.randn(8, 2, generator=g), torch.randn(5, 3, 1, 1, generator=g)]
    opcheck(torch.ops.catfast.merge_lora_.default, ([w.clone() for w in ws], downs, ups, [0.5, -2.0]))
    got, want = [w.clone() for w in ws], [w.clone() for w in ws]
    torch.ops.catfast.merge_lora_(got, downs, ups, [0.5, -2.0])
    merge_lora_ref_(want, downs, ups, [0.5, -2.0])
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-6, "merge")
        assert not torch.equal(a, ws[0]) if a.shape == ws[0].shape else True
