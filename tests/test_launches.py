"""What a CAT step issues (issue "One pass that is cheaper to issue than three"): the launch counter's rules, the
fused step's launching ops on SD1.5's module structure against the official three-call step and catfast's
reference, the LoRA layer's budget, and no host sync in a step."""

import contextlib

import pytest
import torch

import catfast
from catfast.bench.launches import LaunchCounter, count_step
from catfast.bench.train_step import _loss_fns, _setup, _step
from catfast.ops.lora import lora_linear
from catfast.rows import NO_ADAPTER, RowPlan

pytestmark = pytest.mark.usefixtures("one_thread")

FUSED = ("fused:one-call", "fused:teacher-first")


def test_counter_counts_work_not_views_allocations_or_syncs_as_launches():
    x = torch.randn(4, 6)
    with LaunchCounter() as c:
        y = x.view(6, 4).t()  # views: nothing launched
        z = torch.empty(3, 3)  # a bare allocation: nothing launched
        w = x + 1  # one kernel
        x.mul_(2)  # one kernel
        torch.zeros(2)  # a fill: one kernel
        value = w.sum().item()  # a reduction and a read of its value: a host sync
        torch.nonzero(x > 0)  # a comparison and a data-dependent size: a host sync
    assert y.shape == (4, 6) and z.shape == (3, 3) and isinstance(value, float)
    assert c.syncs == {"_local_scalar_dense": 1, "nonzero": 1}
    assert c.launches == {"add": 1, "mul_": 1, "zeros": 1, "sum": 1, "_local_scalar_dense": 1, "gt": 1, "nonzero": 1}


@pytest.fixture(scope="module")
def skeleton_counts():
    """Launching ops and host syncs of one step of every entry on sd15-skeleton (CATFAST_CONV=native: the GEMM
    convolutions are a CPU choice; a GPU runs torch's)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CATFAST_CONV", "native")
    names = ["official", "reference", *FUSED]
    unet, sched, batch, teacher = _setup("sd15-skeleton", 1, 4, torch.float32, "cpu", 0)
    fns = _loss_fns(names, unet, sched, batch, teacher)
    counts = {}
    for name in names:
        step = lambda name=name: _step(unet, fns[name][0], contextlib.nullcontext)  # noqa: E731
        step()
        counts[name] = count_step(step)
    mp.undo()
    return counts


@pytest.mark.parametrize("name", FUSED)
def test_fused_step_issues_at_most_half_the_official_steps_launches(skeleton_counts, name):
    """Both layouts: <= 0.5x the three-call official step's launching ops and <= the reference's."""
    official, reference = skeleton_counts["official"].launch_ops, skeleton_counts["reference"].launch_ops
    fused = skeleton_counts[name].launch_ops
    assert fused <= 0.5 * official, (fused, official, skeleton_counts[name].launches.most_common(12))
    assert fused <= reference, (fused, reference)


@pytest.mark.parametrize("name", ["official", "reference", *FUSED])
def test_no_host_sync_in_a_step(skeleton_counts, name):
    assert skeleton_counts[name].host_syncs == 0, skeleton_counts[name].syncs


def test_no_per_layer_bookkeeping_around_a_lora_layer():
    """One LoRA Linear over the fused layout [2 adapter samples with grad | 1 teacher sample]: the forward is the
    frozen GEMM and two launches (shrink, expand-and-add in place); the backward is dX's GEMM, the LoRA term's
    two, dA and dB, and one fill of the teacher rows' dX: no zeros / copies / index_copy of rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    weight, bias = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    a = torch.randn(1, 4, 16, generator=g).requires_grad_()
    b = torch.randn(1, 8, 4, generator=g).requires_grad_()  # random B: a zero B would hide a wrong LoRA term
    plan = RowPlan.build([0, 0, NO_ADAPTER], [0.5, 0.5, 0.0], [True, True, False])
    plan.grad_samples(), plan.grad_plan  # the plan's index tensors and sub-plans: made once per plan (a step)
    with LaunchCounter() as fwd:
        y = lora_linear(x, weight, bias, a, b, plan)
    assert fwd.launch_ops == 3, fwd.launches
    dy = torch.randn(y.shape, generator=g)
    with LaunchCounter() as bwd:
        y.backward(dy)
    assert bwd.launch_ops <= 6 and not bwd.syncs, bwd.launches
    assert {"zeros", "copy_", "index_copy_", "index", "index_select"}.isdisjoint(bwd.launches), bwd.launches
    with torch.no_grad():  # the values: the reference's, teacher rows untouched by the adapter
        want = x @ weight.t() + bias
        want[:2] += 0.5 * (x[:2] @ a[0].t()) @ b[0].t()
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)
    assert x.grad[2].abs().sum() == 0 and x.grad[:2].abs().sum() > 0


def test_fused_step_without_host_syncs_on_the_tiny_unet(tiny_lora_unet):
    """The trainer's path: a patched UNet, both layouts, and the reference: 0 host syncs."""
    from catfast.integrations.patch import patch_unet, unpatch_unet
    from catfast.testing import cat_batch

    unet, sched = tiny_lora_unet
    batch = cat_batch(2)
    for mode, layout in (("reference", "auto"), ("fused", "one-call"), ("fused", "teacher-first")):
        if mode == "fused":
            patch_unet(unet)
        counter = count_step(lambda: catfast.cat_loss(unet, sched, **batch, mode=mode, layout=layout).total.backward())
        if mode == "fused":
            unpatch_unet(unet)
        assert counter.host_syncs == 0, (mode, layout, counter.syncs)
        assert counter.launch_ops > 100


@pytest.fixture
def tiny_lora_unet():
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from catfast.integrations.factory import build_unet
    from catfast.integrations.schedulers import SCHEDULER_CONFIG
    from catfast.testing import randomize_lora_

    unet = build_unet("tiny", seed=0).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora_(unet, seed=1)
    return unet, DDPMScheduler(**SCHEDULER_CONFIG)


def test_a_triton_kernel_counts_as_one_launch():
    """A Triton launch is not an aten op: the counter adds the kernels catfast's launchers start (on the CPU the
    interpreter's own tensor copies show up too; on a GPU they do not exist)."""
    x, w = torch.randn(3, 16, 32), torch.randn(32, 32)
    a, b = torch.randn(1, 4, 32), torch.randn(1, 32, 4)
    plan = RowPlan.build([0, 0, NO_ADAPTER], [1.0, 1.0, 0.0], [True, True, False])
    with LaunchCounter() as c:
        lora_linear(x, w, None, a, b, plan, backend="triton")
    assert c.launches["triton::lora_gemm"] == 1
