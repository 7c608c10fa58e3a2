"""The extension's CPU ops against their pure-torch references: the fused CAT loss, fused GroupNorm + SiLU
with its row-aware backward, and the one-pass adapter swap; plus bad input (messages name the argument).
The CUDA versions have the same tests in tests/test_cuda_ops.py (they need a GPU)."""

import os

import pytest
import torch

from catfast._ext import EXT, EXT_ERROR
from catfast.ops import cat_loss as loss_ops
from catfast.ops import groupnorm_silu as gn_ops
from catfast.ops import merge as merge_ops
from catfast.reference.cat_loss import cat_loss_ref
from catfast.reference.groupnorm_silu import group_norm_silu_backward_ref, group_norm_silu_ref
from catfast.reference.merge import merge_lora_ref_, swap_lora_ref_
from catfast.testing import FLOOR, assert_close_to_ref, assert_rel_close

# CI builds the extension with CATFAST_REQUIRE_EXT=1; there its absence is a failure, not a skip.
if os.environ.get("CI") and EXT is None:
    raise RuntimeError(f"catfast._C must be built in CI: {EXT_ERROR}")
pytestmark = pytest.mark.skipif(EXT is None, reason=f"catfast._C not built: {EXT_ERROR}")

LOWP = (torch.float16, torch.bfloat16)


def _preds(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    stripped = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    target, teacher = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return pred, target, stripped, teacher


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 4, 13, 11), (1, 4, 64, 72)])  # odd sizes, several chunks
def test_cat_loss_matches_reference(dtype, weighted, shape, monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    weights = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)) + 0.1 if weighted else None
    pred, target, stripped, teacher = _preds(shape, dtype)
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in (pred, target, stripped, teacher)]
    out = loss_ops.fused_cat_loss(pred, target, stripped, teacher, weights=weights, cat_weight=0.7)
    ref = cat_loss_ref(*ref_in, weights, 0.7)
    for name, a, b in zip(("total", "ldm", "cat"), out, ref):
        assert_rel_close(a, b, 1e-6, name)
    # upstream gradients on every output, as autograd combines them
    (out.total + 0.3 * out.ldm + 2.0 * out.cat).backward()
    (ref[0] + 0.3 * ref[1] + 2.0 * ref[2]).backward()
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps  # one rounding of the same fp32 value
    assert pred.grad.dtype == dtype and stripped.grad.dtype == dtype
    assert_rel_close(pred.grad, ref_in[0].grad, tol, "d pred")
    assert_rel_close(stripped.grad, ref_in[2].grad, tol, "d pred_stripped")


def test_cat_loss_without_cat_term_and_dispatch(monkeypatch):
    pred, target, _, _ = _preds((2, 4, 6, 6), torch.float32)
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    out = loss_ops.fused_cat_loss(pred, target)
    ref = cat_loss_ref(pred.detach(), target)
    assert_rel_close(out.ldm, ref[1], 1e-6, "ldm")
    assert out.cat.item() == 0.0 and out.total.item() == out.ldm.item()
    out.total.backward()
    assert_rel_close(pred.grad, 2 * (pred.detach() - target) / pred.numel(), 1e-6, "d pred")
    monkeypatch.setenv("CATFAST_BACKEND", "torch")  # the reference under autograd gives the same
    assert_rel_close(loss_ops.fused_cat_loss(pred, target).total, ref[0], 1e-6, "torch backend")
    reasons = loss_ops.ext_not_supported_reasons([pred.double()])
    assert any("float32/float16/bfloat16" in r for r in reasons)
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="CATFAST_BACKEND=ext"):
        loss_ops.fused_cat_loss(pred.double(), target.double())


def test_cat_loss_bad_input():
    pred, target, stripped, teacher = _preds((2, 4, 6, 6), torch.float32)
    with pytest.raises(ValueError, match="target shape"):
        loss_ops.fused_cat_loss(pred, target[:1], stripped, teacher)
    with pytest.raises(ValueError, match="come together"):
        loss_ops.fused_cat_loss(pred, target, stripped, None)
    with pytest.raises(ValueError, match=r"weights must be \[B\]=\[2\]"):
        loss_ops.fused_cat_loss(pred, target, stripped, teacher, weights=torch.ones(3))
    with pytest.raises(ValueError, match="teacher is on meta"):
        loss_ops.fused_cat_loss(pred, target, stripped, torch.empty(pred.shape, device="meta"))
    with pytest.raises(ValueError, match="cat_weight"):
        loss_ops.fused_cat_loss(pred, target, stripped, teacher, cat_weight=-1.0)
    p = pred.detach()
    with pytest.raises(RuntimeError, match="target must be contiguous"):  # the C++ op's own checks
        EXT.cat_loss_cpu(p, target.transpose(2, 3), None, None, None, 1.0)
    with pytest.raises(RuntimeError, match="teacher must be float32, float16 or bfloat16"):
        EXT.cat_loss_cpu(p, target, p, teacher.to(torch.int32), None, 1.0)
    with pytest.raises(RuntimeError, match="weights must be a contiguous float32"):
        EXT.cat_loss_cpu(p, target, None, None, torch.ones(2, dtype=torch.float64), 1.0)


# (x shape, groups): odd sizes, a 1-position map, SD1.5-like widths
GN_CASES = [((3, 12, 5, 7), 4), ((2, 64, 8, 8), 32), ((4, 6, 1), 3), ((1, 320, 16, 16), 32)]


def _gn_inputs(shape, groups, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).requires_grad_(True)
    w = (torch.randn(shape[1], generator=g)).requires_grad_(True) if affine else None
    b = (torch.randn(shape[1], generator=g)).requires_grad_(True) if affine else None
    return x, w, b


@pytest.mark.parametrize("shape,groups", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_silu_matches_reference(shape, groups, affine, monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    x, w, b = _gn_inputs(shape, groups, affine=affine)
    y = gn_ops.group_norm_silu(x, groups, w, b, 1e-5)
    assert_rel_close(y, group_norm_silu_ref(x.detach(), groups, w, b), 1e-5, "y")
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    y.backward(dy)
    # fp64 ground truth; the error may be twice that of torch's own fp32 backward (tiny groups cancel badly)
    exact = group_norm_silu_backward_ref(dy.double(), x.double(), groups, *(_double(t) for t in (w, b)), 1e-5)
    torch32 = group_norm_silu_backward_ref(dy, x, groups, w, b, 1e-5)
    grads = (x.grad, w.grad, b.grad) if affine else (x.grad,)
    for name, got, e, t in zip(("dx", "dweight", "dbias"), grads, exact, torch32):
        assert_close_to_ref(got, e, t, name)


def _double(t):
    return t.detach().double() if t is not None else None


def test_group_norm_silu_row_aware_backward(monkeypatch):
    """The teacher rows' dx is zero and they add nothing to dweight / dbias, even when their dy is not zero
    (the op's contract: those rows' gradient is known zero)."""
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    x, w, b = _gn_inputs((4, 12, 5, 5), 3)
    grad = torch.tensor([True, False, True, False])
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    gn_ops.group_norm_silu(x, 3, w, b, grad_samples=grad.tolist()).backward(dy)
    dx, dw, db = group_norm_silu_backward_ref(dy, x, 3, w, b, 1e-5, grad)
    assert (x.grad[~grad] == 0).all() and (x.grad[grad].abs() > 0).any()
    assert_rel_close(x.grad, dx, 1e-5, "dx")
    assert_rel_close(w.grad, dw, 1e-5, "dweight")
    assert_rel_close(b.grad, db, 1e-5, "dbias")
    # with dy zero on those rows it is exactly the full backward
    dy[~grad] = 0
    full = group_norm_silu_backward_ref(dy, x, 3, w, b, 1e-5)
    assert_rel_close(dx, full[0], 1e-6, "dx vs full backward")


@pytest.mark.parametrize("dtype", LOWP)
def test_group_norm_silu_half_on_cpu_runs_torch(dtype, monkeypatch):
    """The C++ CPU version is fp32 only (bf16 measured slower than torch): half inputs run torch, within
    the precision rule against the fp32 reference."""
    monkeypatch.delenv("CATFAST_BACKEND", raising=False)
    x, w, b = _gn_inputs((2, 12, 6, 6), 4)
    xl, wl, bl = (t.detach().to(dtype) for t in (x, w, b))
    assert any("float32 only" in r for r in gn_ops.ext_not_supported_reasons(xl))
    y = gn_ops.group_norm_silu(xl, 4, wl, bl)
    ref32 = group_norm_silu_ref(xl.float(), 4, wl.float(), bl.float())
    err = (y.double() - ref32.double()).abs().max().item()
    assert err <= 4 * torch.finfo(dtype).eps * ref32.abs().max().item() + FLOOR[dtype]


def test_group_norm_silu_bad_input():
    x, w, b = _gn_inputs((2, 12, 4, 4), 4)
    with pytest.raises(ValueError, match=r"num_groups \(5\) must divide the channels of x \(12\)"):
        gn_ops.group_norm_silu(x, 5, w, b)
    with pytest.raises(ValueError, match=r"weight must be \[C\]=\[12\]"):
        gn_ops.group_norm_silu(x, 4, w[:6], b)
    with pytest.raises(ValueError, match="bias is on meta"):
        gn_ops.group_norm_silu(x, 4, w, torch.empty(12, device="meta"))
    with pytest.raises(ValueError, match="grad_samples must have one entry per sample"):
        gn_ops.group_norm_silu(x, 4, w, b, grad_samples=[True])
    xd = x.detach()
    with pytest.raises(RuntimeError, match="x must be contiguous"):  # the C++ op's own checks
        EXT.group_norm_silu_fwd_cpu(xd.transpose(2, 3), None, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32"):
        EXT.group_norm_silu_fwd_cpu(xd.double(), None, None, 4, 1e-5)
    _, mean, rstd = EXT.group_norm_silu_fwd_cpu(xd, None, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match="grad_output must be a contiguous"):
        EXT.group_norm_silu_bwd_cpu(xd[:1], xd, None, None, mean, rstd, None, 4)
    with pytest.raises(RuntimeError, match=r"row_mask must be a contiguous uint8 \[N\]"):
        EXT.group_norm_silu_bwd_cpu(xd, xd, None, None, mean, rstd, torch.ones(3, dtype=torch.uint8), 4)
    with pytest.raises(RuntimeError, match="rstd must be a contiguous float32"):
        EXT.group_norm_silu_bwd_cpu(xd, xd, None, None, mean, rstd[:1], None, 4)


def _swap_layers(dtype, seed=0):
    """Two adapters of different ranks on Linear and Conv2d weights; B random (never zero)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [((320, 320), 4, 16), ((97, 123), 1, 8), ((64, 32, 3, 3), 8, 2), ((40, 24, 1, 1), 3, 3)]
    weights, adapters = [], (([], [], []), ([], [], []))
    for shape, r_out, r_in in shapes:
        weights.append(torch.randn(shape, generator=g).to(dtype))
        for (downs, ups, scales), r in ((adapters[0], r_out), (adapters[1], r_in)):
            downs.append(torch.randn((r, *shape[1:]), generator=g) / shape[1] ** 0.5)
            ups.append(torch.randn((shape[0], r, *([1] * (len(shape) - 2))), generator=g))
            scales.append(float(torch.rand((), generator=g)) * 2 - 0.5)
    return weights, adapters[0], adapters[1]


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_swap_matches_reference_and_rounds_once(dtype, monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    weights, old, new = _swap_layers(dtype)
    merge_lora_ref_(weights, *old)  # the old adapter is merged
    ref = [w.clone() for w in weights]
    two_pass = [w.clone() for w in weights]
    swap_lora_ref_(ref, *old, *new)
    merge_lora_ref_(two_pass, old[0], old[1], [-s for s in old[2]])
    merge_lora_ref_(two_pass, *new)
    before = [w.double() for w in weights]
    merge_ops.swap_lora_(weights, *old, *new)
    for i, (w, r, t, b0) in enumerate(zip(weights, ref, two_pass, before)):
        a_o, b_o, a_n, b_n = old[0][i], old[1][i], new[0][i], new[1][i]
        exact = b0 + (
            new[2][i] * (b_n.reshape(len(b_n), -1).double() @ a_n.reshape(len(a_n), -1).double())
            - old[2][i] * (b_o.reshape(len(b_o), -1).double() @ a_o.reshape(len(a_o), -1).double())
        ).view(w.shape)
        if dtype == torch.float32:
            assert_rel_close(w, r, 1e-6, f"layer {i}")
        else:  # one rounding of the fp32 sum: within one spacing of the exact value, never worse than two passes
            spacing = torch.finfo(dtype).eps * exact.abs() + 1e-6 * exact.abs().max()
            assert ((w.double() - exact).abs() <= spacing).all(), f"layer {i}"
            assert (w.double() - exact).abs().max() <= (t.double() - exact).abs().max() + 1e-6, f"layer {i}"


def test_swap_bad_layer_leaves_weights_untouched(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    weights, old, new = _swap_layers(torch.float32)
    new[0][2] = torch.randn(8, 31, 3, 3)  # wrong fan-in in the incoming adapter's third layer
    before = [w.clone() for w in weights]
    with pytest.raises(ValueError, match="layer 2"):
        merge_ops.swap_lora_(weights, *old, *new)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    with pytest.raises(ValueError, match="same length"):
        merge_ops.swap_lora_(weights, old[0][:1], *old[1:], *new)


def test_merge_refuses_an_empty_weight(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    with pytest.raises(ValueError, match="layer 0: weight must not be empty"):
        merge_ops.merge_lora_([torch.zeros(0, 8)], [torch.randn(2, 8)], [torch.zeros(0, 2)], [1.0])


def test_merge_refuses_tensors_on_several_devices(monkeypatch):
    w = torch.randn(8, 8)
    a, b = torch.randn(2, 8), torch.randn(8, 2, device="meta")
    reasons = merge_ops.ext_not_supported_reasons([w], [a], [b])
    assert any("several devices" in r for r in reasons)
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="several devices"):
        merge_ops.merge_lora_([w], [a], [b], [1.0])


def test_group_norm_silu_cpu_size_rule(monkeypatch):
    """By default the CPU runs the C++ version from 32x32 positions per channel and torch below (measured)."""
    monkeypatch.delenv("CATFAST_BACKEND", raising=False)
    small = torch.randn(2, 8, 8, 8, requires_grad=True)
    large = torch.randn(1, 8, 32, 32, requires_grad=True)
    assert "Silu" in type(gn_ops.group_norm_silu(small, 4).grad_fn).__name__  # torch's silu
    assert "GroupNormSilu" in type(gn_ops.group_norm_silu(large, 4).grad_fn).__name__  # the extension
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    assert "GroupNormSilu" in type(gn_ops.group_norm_silu(small, 4).grad_fn).__name__
