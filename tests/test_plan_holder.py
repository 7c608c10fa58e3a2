"""catfast/nn/plan_holder.py on its own: the per-call plan, per-layer scaled plans, and the shared-prefix /
twin-group stages (what runs once and what each stage hands its modules)."""

import pytest
import torch

from catfast.nn.plan_holder import PlanHolder
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import cat_plan


def test_empty_holder_and_split():
    h = PlanHolder()
    assert h.plan is None and not h.split and not h.in_prefix and not h.twins
    h.set(cat_plan(1))
    assert h.split  # grad and teacher rows
    h.set(RowPlan.build([0, 0], needs_grad=True))
    assert not h.split
    h.set(None)
    assert h.plan is None and h.input_memo == {}


def test_scaled_plan_multiplies_by_the_slot_scaling_once_per_call():
    h = PlanHolder()
    plan = RowPlan.build([1, 0, NO_ADAPTER], [2.0, 3.0, 0.0], [True, True, False])
    h.set(plan)
    scaled = h.scaled_plan((0.5, 4.0))
    assert scaled.scales.tolist() == [8.0, 1.5, 0.0]  # slot 1: 2 x 4, slot 0: 3 x 0.5, base row stays 0
    assert scaled.layout is plan.layout  # shares the host layout (no device read)
    assert h.scaled_plan((0.5, 4.0)) is scaled and h.scaled_plan((1.0, 1.0)) is not scaled
    assert scaled.host_scales() == (8.0, 1.5, 0.0)  # known on the host: the one-adapter fast path reads it
    h.set(RowPlan.build([1, 0, NO_ADAPTER], [2.0, 3.0, 0.0], [True, True, False]))  # the next step's plan
    assert h.plan is plan and h.scaled_plan((0.5, 4.0)) is scaled  # the same plan: made once per run


def test_prefix_runs_once_then_twins_until_cross_attention():
    h = PlanHolder()
    h.set(cat_plan(2), prefix_groups=3, twin_groups=True)
    assert h.in_prefix and not h.twins
    seen = []
    x = torch.arange(6.0).repeat_interleave(2).view(6, 2)

    def fn(rows):
        seen.append(rows.shape[0])
        return rows * 10

    y = h.prefix_shared(x, fn)
    assert seen == [2] and torch.equal(y, torch.cat([x[:2] * 10] * 3))  # one group computed, repeated
    assert h.prefix_shared(x[:3], fn) is None  # not the call's rows: not shared
    h.lora_layer_reached()
    assert not h.in_prefix and h.twins and h.prefix_shared(x, fn) is None
    assert h.shares_twins(x) and not h.shares_twins(x[:4])
    h.cross_attention_reached()
    assert not h.twins and not h.in_prefix


def test_twin_shared_runs_groups_one_on_and_restores_the_state():
    h = PlanHolder()
    plan = RowPlan.build([0, 0, 0, 0, NO_ADAPTER, NO_ADAPTER], [1.0] * 4 + [0.0] * 2, [True] * 4 + [False] * 2)
    h.set(plan, prefix_groups=3, twin_groups=True)
    h.lora_layer_reached()
    x = torch.randn(6, 3)
    inner = []

    def fn(rows):
        inner.append((rows.shape[0], h.plan.layout.slots, h.twins))
        return rows + 1

    y = h.twin_shared(x, fn)
    assert inner == [(4, (0, 0, -1, -1), False)]  # groups 1 and 2 with their plan, no nested sharing
    assert torch.equal(y, torch.cat([x[2:4] + 1, x[2:] + 1]))  # group 0's output is group 1's
    assert h.plan is plan and h.twins  # restored

    def boom(rows):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        h.twin_shared(x, boom)
    assert h.plan is plan and h.twins  # restored after a failure too


def test_twin_groups_refusals_and_snapshot():
    h = PlanHolder()
    with pytest.raises(ValueError, match="needs identical_groups >= 2"):
        h.set(cat_plan(1), prefix_groups=1, twin_groups=True)
    differs = RowPlan.build([0, 1, NO_ADAPTER], [1.0, 1.0, 0.0], [True, True, False])
    with pytest.raises(ValueError, match="groups 0 and 1 of the row plan differ"):
        h.set(differs, prefix_groups=3, twin_groups=True)
    assert h.plan is None  # a refused plan is not half set
    h.set(cat_plan(1), prefix_groups=3)
    state = h.snapshot()
    h.lora_layer_reached()
    assert not h.in_prefix and not h.twins  # prefix only: no twin stage without twin_groups
    h.restore(state)
    assert h.in_prefix
