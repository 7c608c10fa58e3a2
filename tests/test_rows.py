"""catfast/rows.py on its own: run_of, RowPlan construction and validation, the host layout's sample
groups, and that plans built or derived on the host never read the device."""

import pytest
import torch

from catfast.rows import NO_ADAPTER, RowLayout, RowPlan, cached_property, run_of
from catfast.testing import cat_plan


class _CountToList:
    """Counts Tensor.tolist calls (how the plan reads the device: on a GPU each one synchronises; on the CPU
    no dispatch-level op shows it, so the call itself is counted)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = torch.Tensor.tolist

        def counting(t):
            self.calls += 1
            return original(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counting)


@pytest.mark.parametrize(
    "samples, run",
    [((), None), ((3,), (3, 4)), ((2, 3, 4), (2, 5)), ((0, 2), None), ((3, 2), None), ((1, 2, 2), None)],
)
def test_run_of(samples, run):
    assert run_of(samples) == run


def test_build_broadcasts_scalars_and_checks_lengths():
    plan = RowPlan.build([0, NO_ADAPTER, 1], scales=0.5, needs_grad=False)
    assert plan.slots.tolist() == [0, -1, 1] and plan.scales.dtype == torch.float32
    assert plan.scales.tolist() == [0.5] * 3 and plan.needs_grad.tolist() == [False] * 3
    assert len(plan) == 3 and plan.host_scales() == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="one value per sample: 3 slots, 2 scales"):
        RowPlan.build([0, 0, 0], scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="must be a sequence of ints"):
        RowPlan.build(0)
    with pytest.raises(ValueError, match="slot -2 is invalid"):
        RowPlan.build([0, -2])


def test_validate_names_slot_batch_and_shape_errors():
    plan = RowPlan.build([0, 2, NO_ADAPTER])
    plan.validate(num_slots=3, batch=3)
    with pytest.raises(ValueError, match="uses adapter slot 2 but the layer has 2 slot"):
        plan.validate(num_slots=2)
    with pytest.raises(ValueError, match="3 rows but the batch has 4"):
        plan.validate(batch=4)
    bad = RowPlan(torch.zeros(3, dtype=torch.int64), torch.ones(2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D of equal length"):
        bad.validate()


def test_layout_groups():
    # samples: 0 slot1 grad, 1 base no-grad, 2 slot0 grad, 3 slot1 no-grad, 4 slot0 grad
    plan = RowPlan.build([1, NO_ADAPTER, 0, 1, 0], needs_grad=[True, False, True, False, True])
    lay = plan.layout
    assert lay.grad_samples == (0, 2, 4) and lay.other_samples == (1, 3)
    assert lay.adapter_samples == (0, 2, 3, 4) and lay.slots_used == (0, 1)
    assert lay.adapter_order == (2, 4, 0, 3)  # grouped by slot, each group in sample order
    assert lay.by_slot == ((0, True, (2, 4)), (1, True, (0,)), (1, False, (3,)))  # grad group first
    assert lay.grad_run is None and lay.other_run is None and lay.adapter_run is None
    assert plan.grad_samples().tolist() == [0, 2, 4] and plan.other_samples().tolist() == [1, 3]
    assert lay.subset([3, 0]) == RowLayout((1, 1), (False, True))


def test_cat_layout_puts_grad_rows_first_as_runs():
    plan = cat_plan(2, slot=1, scale=0.75)
    assert plan.slots.tolist() == [1, 1, 1, 1, -1, -1]
    assert plan.scales.tolist() == [0.75] * 4 + [0.0] * 2
    assert plan.layout.grad_run == (0, 4) and plan.layout.other_run == (4, 6) and plan.layout.adapter_run == (0, 4)


def test_host_built_and_derived_plans_never_read_the_device(monkeypatch):
    mode = _CountToList(monkeypatch)
    plan = RowPlan.build([0, 1, NO_ADAPTER, 0], [1.0, 2.0, 0.0, 3.0], [True, True, False, True])
    sub = plan.select([3, 0])
    assert sub.layout.slots == (0, 0) and sub.host_scales() == (3.0, 1.0)
    scaled = plan.with_scales(plan.scales * 2)
    _ = (plan.grad_plan.layout.by_slot, scaled.layout.adapter_order, plan.grad_samples(), plan.layout.grad_run)
    assert mode.calls == 0
    assert sub.slots.tolist() == [0, 0] and sub.scales.tolist() == [3.0, 1.0]
    assert scaled.index((0, 1)) is plan.index((0, 1))  # with_scales shares the index cache
    assert plan.grad_plan.slots.tolist() == [0, 1, 0]


def test_plans_from_device_tensors_read_once(monkeypatch):
    plan = RowPlan(torch.tensor([1, NO_ADAPTER]), torch.tensor([0.5, 0.0]), torch.tensor([True, False]))
    mode = _CountToList(monkeypatch)
    assert plan.layout.slots == (1, -1) and mode.calls == 2  # slots and needs_grad, once
    assert plan.layout.needs_grad == (True, False) and plan.host_scales() == (0.5, 0.0)
    plan.host_scales()
    assert plan.layout is plan.layout and mode.calls == 3  # and the scales, once
    sel = plan.select(torch.tensor([1]))  # an index tensor: the derived plan reads its own layout
    assert sel.layout.slots == (-1,)
    assert plan.index([0, 1]) is plan.index((0, 1))


def test_cached_property_computes_once_and_stores_in_the_instance():
    calls = []

    class Thing:
        @cached_property
        def value(self):
            """the doc"""
            calls.append(1)
            return 42

    t = Thing()
    assert t.value == 42 and t.value == 42 and calls == [1]
    assert t.__dict__["value"] == 42 and Thing.value.__doc__ == "the doc"


def test_build_returns_the_same_plan_for_the_same_values_within_its_cache(monkeypatch):
    """A training run builds the same plan every step: its device tensors are made once (and a captured CUDA graph
    reads the same ones). Different values, or a plan pushed out of the bounded cache, give a new plan."""
    import catfast.rows as rows

    monkeypatch.setattr(rows, "PLAN_CACHE", 2)
    monkeypatch.setattr(rows, "_built", {})
    a = RowPlan.build([0, 0, NO_ADAPTER], [1.0, 1.0, 0.0], [True, True, False])
    index = a.grad_samples()
    assert RowPlan.build([0, 0, -1], [1, 1, 0], [1, 1, 0]) is a and a.grad_samples() is index
    assert RowPlan.build([0, 0, NO_ADAPTER], 0.5, [True, True, False]) is not a  # other scales
    RowPlan.build([1], 1.0, True)  # a third plan: the oldest unused one leaves the cache
    assert len(rows._built) == 2
    assert RowPlan.build([0, 0, NO_ADAPTER], [1.0, 1.0, 0.0], [True, True, False]) is not a
