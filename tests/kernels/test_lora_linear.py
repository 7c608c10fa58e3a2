"""The row-planned LoRA linear (Triton kernels and the torch backend) against the pure-torch reference:
outputs and every gradient, odd shapes, ranks 1-64, several adapter slots, teacher rows without grad."""

import pytest
import torch

from catfast.env import has_triton
from catfast.ops.lora import lora_linear
from catfast.reference.lora import lora_linear_ref
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import assert_rel_close

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not has_triton().available, reason="no triton")), "torch"]

# (samples' slots, needs_grad, rows per sample, in, out, rank, slots S)
CASES = [
    ([0, 0, NO_ADAPTER], [True, True, False], 16, 32, 48, 4, 1),  # the CAT layout, B=1
    ([0, 0, 0, 0, NO_ADAPTER, NO_ADAPTER], [True] * 4 + [False] * 2, 7, 123, 97, 1, 1),  # odd shapes, rank 1
    ([2, 0, 1, NO_ADAPTER, 1], [True, True, True, False, False], 5, 40, 24, 8, 3),  # multi-concept, frozen-slot teacher
    ([0, 1], [True, True], 3, 20, 17, 64, 2),  # rank larger than the layer widths
]


def _inputs(case, seed=0, bias=True):
    slots, grad, rows, in_f, out_f, r, s = case
    g = torch.Generator().manual_seed(seed)
    n = len(slots)
    x = torch.randn(n, rows, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    a = (torch.randn(s, r, in_f, generator=g) / in_f**0.5).requires_grad_()
    bb = torch.randn(s, out_f, r, generator=g).requires_grad_()  # random B: a zero B passes any test
    scales = [0.5 + 0.25 * i for i in range(n)]
    plan = RowPlan.build(slots, scales, grad)
    dy = torch.randn(n, rows, out_f, generator=g) * plan.needs_grad.view(n, 1, 1)  # teacher outputs are detached
    return x, w, b, a, bb, plan, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{len(c[0])}-L{c[2]}-{c[3]}x{c[4]}-r{c[5]}-S{c[6]}")
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_outputs_and_gradients(backend, case, bias):
    x, w, b, a, bb, plan, dy = _inputs(case, bias=bias)
    x_ref = x.clone().requires_grad_()
    a_ref, b_ref = a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
    y_ref = lora_linear_ref(x_ref, w, b, a_ref, b_ref, plan)
    y_ref.backward(dy)

    x_k = x.clone().requires_grad_()
    y = lora_linear(x_k, w, b, a, bb, plan, backend=backend)
    assert_rel_close(y.detach(), y_ref.detach(), 1e-5, "y")
    y.backward(dy)
    grad_rows = plan.needs_grad
    assert_rel_close(x_k.grad[grad_rows], x_ref.grad[grad_rows], 1e-5, "dx (grad rows)")
    assert torch.count_nonzero(x_k.grad[~grad_rows]) == 0  # no work spent on the teacher rows
    assert_rel_close(a.grad, a_ref.grad, 1e-5, "dA")
    assert_rel_close(bb.grad, b_ref.grad, 1e-5, "dB")
    assert bb.grad.abs().sum() > 0 and a.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_term_really_applies_per_slot(backend):
    """Against y = x W^T + b computed by hand: rows with an adapter differ by exactly their own delta."""
    x, w, b, a, bb, plan, _ = _inputs(CASES[2])
    with torch.no_grad():
        y = lora_linear(x, w, b, a.detach(), bb.detach(), plan, backend=backend)
        base = x @ w.t() + b
        for n, slot in enumerate(plan.slots.tolist()):
            want = base[n] if slot == NO_ADAPTER else base[n] + plan.scales[n] * (x[n] @ a[slot].t()) @ bb[slot].t()
            assert_rel_close(y[n], want, 1e-5, f"sample {n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_the_grad_rows(backend):
    case = ([0] * 4 + [NO_ADAPTER] * 2, [True] * 4 + [False] * 2, 32, 64, 64, 4, 1)
    saved = {}
    for name, grad in (("cat", case[1]), ("all", [True] * 6)):
        x, w, b, a, bb, plan, _ = _inputs((*case[:1], grad, *case[2:]))
        total = 0

        def pack(t):
            nonlocal total
            if t.data_ptr() not in (w.data_ptr(), a.data_ptr(), bb.data_ptr()):
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lora_linear(x.requires_grad_(), w, b, a, bb, plan, backend=backend)
        saved[name] = total
    assert saved["cat"] * 6 == saved["all"] * 4  # activations saved for 4 of 6 samples, not 6


def test_bad_plans_and_inputs_fail_before_any_kernel():
    x, w, b, a, bb, plan, _ = _inputs(CASES[0])
    with pytest.raises(ValueError, match="row plan has 2 rows but the batch has 3"):
        lora_linear(x, w, b, a, bb, RowPlan.build([0, 0]))
    with pytest.raises(ValueError, match="slot 1 but the layer has 1 slot"):
        lora_linear(x, w, b, a, bb, RowPlan.build([0, 1, 0]))
    with pytest.raises(ValueError, match="is torch.float64 but x is torch.float32"):
        lora_linear(x, w.double(), b, a, bb, plan)
    with pytest.raises(ValueError, match="do not fit weight"):
        lora_linear(x, w, b, a[:, :, :5], bb, plan)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.clone().requires_grad_(), b, a, bb, plan)
    with pytest.raises(ValueError, match="invalid"):
        RowPlan.build([0, -2])
