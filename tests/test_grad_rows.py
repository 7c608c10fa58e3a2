"""catfast/ops/grad_rows.py's public behaviour: row gathers and scatters (a run scattered in one launch), the
frozen conv / linear whose backward skips the other samples, split_rows, and autocast_inputs."""

import pytest
import torch
import torch.nn.functional as F

from catfast.bench.launches import count_step
from catfast.ops.grad_rows import (
    autocast_inputs,
    frozen_conv2d,
    frozen_linear,
    gather_rows,
    sample_rows,
    scatter_rows,
    split_rows,
    take_samples,
)
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import assert_rel_close, cat_plan

SCATTERED = RowPlan.build([0, NO_ADAPTER, 0, 0], needs_grad=[True, False, False, True])  # grad samples 0, 3
CAT = cat_plan(2)  # grad samples 0..3 (a run), teacher 4, 5


def test_take_gather_scatter_and_sample_rows():
    t = torch.arange(4 * 3 * 2, dtype=torch.float32).view(12, 2)  # 4 samples x 3 rows
    idx = torch.tensor([0, 3])
    assert sample_rows(idx, 3).tolist() == [0, 1, 2, 9, 10, 11]
    kept = gather_rows(t, idx, None, 4)
    assert torch.equal(kept, t[[0, 1, 2, 9, 10, 11]])
    full = scatter_rows(kept, t.shape, idx, None, 4)
    assert torch.equal(full[[0, 1, 2, 9, 10, 11]], kept) and full[3:9].abs().sum() == 0
    run_kept = gather_rows(t, torch.tensor([1, 2]), (1, 3), 4)
    assert torch.equal(run_kept, t[3:9]) and run_kept.data_ptr() != t.data_ptr()  # a copy, not a view
    back = scatter_rows(run_kept, t.shape, torch.tensor([1, 2]), (1, 3), 4)
    assert torch.equal(back[3:9], t[3:9]) and back[:3].abs().sum() == 0 and back[9:].abs().sum() == 0
    assert scatter_rows(t, t.shape, torch.arange(4), (0, 4), 4) is t  # every sample: nothing to do
    s = torch.arange(8.0).view(4, 2)
    view = take_samples(s, torch.tensor([1, 2]), (1, 3))
    assert view.data_ptr() == s[1].data_ptr()  # a run is a view
    assert torch.equal(take_samples(s, torch.tensor([3, 0]), None), s[[3, 0]])


@pytest.mark.parametrize("run", [(0, 2), (1, 3), (2, 4)], ids=["first", "middle", "last"])
def test_scatter_of_a_run_is_one_launch(run):
    kept, samples = torch.randn(2 * 3, 5), torch.arange(*run)
    counter = count_step(lambda: scatter_rows(kept, (12, 5), samples, run, 4))
    assert counter.launch_ops == 1, counter.launches
    full = scatter_rows(kept, (12, 5), torch.arange(*run), run, 4)
    lo, hi = run[0] * 3, run[1] * 3
    assert torch.equal(full[lo:hi], kept) and full[:lo].abs().sum() == 0 and full[hi:].abs().sum() == 0


def test_frozen_linear_and_conv_backward_only_for_grad_samples():
    plan = SCATTERED
    lin = torch.nn.Linear(6, 4).requires_grad_(False)
    x = torch.randn(4, 5, 6, requires_grad=True)
    y = frozen_linear(x, lin, plan)
    assert_rel_close(y, lin(x), 1e-6, "linear forward")
    dy = torch.randn_like(y)
    y.backward(dy)
    want = dy @ lin.weight
    assert_rel_close(x.grad[[0, 3]], want[[0, 3]], 1e-5, "linear dx")
    assert x.grad[[1, 2]].abs().sum() == 0
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).requires_grad_(False)
    xc = torch.randn(4, 3, 7, 7, requires_grad=True)
    yc = frozen_conv2d(xc, conv, plan)
    assert_rel_close(yc, conv(xc), 1e-6, "conv forward")
    dyc = torch.randn_like(yc)
    yc.backward(dyc)
    want = torch.nn.grad.conv2d_input(xc.shape, conv.weight, dyc, 2, 1)
    assert_rel_close(xc.grad[[0, 3]], want[[0, 3]], 1e-5, "conv dx")
    assert xc.grad[[1, 2]].abs().sum() == 0


@pytest.mark.parametrize("plan", [SCATTERED, CAT], ids=["scattered", "cat-run"])
def test_split_rows_equals_fn_and_grads_only_grad_rows(plan):
    n = len(plan)
    q = torch.randn(n, 2, 5, 4, requires_grad=True)
    k = torch.randn(n, 2, 5, 4, requires_grad=True)
    out = split_rows(F.scaled_dot_product_attention, plan, q, k, k)
    assert_rel_close(out, F.scaled_dot_product_attention(q, k, k), 1e-5, "split_rows forward")
    out.sum().backward()
    other = plan.other_samples()
    assert q.grad[other].abs().sum() == 0 and q.grad[plan.grad_samples()].abs().sum() > 0


def test_autocast_inputs_casts_like_torch():
    x, w, b = torch.randn(2, 3), torch.randn(4, 3), None
    assert autocast_inputs(x, w, b)[1] is w  # autocast off: unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, cw, cb = autocast_inputs(x, w, b)
    assert cx.dtype == cw.dtype == torch.bfloat16 and cb is None
