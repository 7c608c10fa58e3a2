"""The state of one row-planned UNet call, shared by every patched module of that UNet.

Besides the plan, it tracks which rows are still identical, so shared work runs once (docs/design.md,
"Sharing work between rows"). With the fused CAT layout [trigger | stripped | teacher] (G = 3 groups of B samples):
- prefix: all groups are identical until the first LoRA layer or cross-attention; frozen modules
  compute one group and repeat it.
- twins: after the first LoRA layer, groups 0 and 1 (the adapter on both captions) stay identical until
  the first cross-attention, where the captions enter; every patched module computes groups 1.. only
  and group 0 is copied from group 1. In backward the two copies' gradients add up in group 1's
  computation, so its backward also runs once.
Unpatched modules between them (norms, activations, residual adds) still see all rows.
"""

from __future__ import annotations

import torch

from catfast.rows import RowPlan, host_to_device


class PlanHolder:
    """The row plan of the current call, the per-layer-scaled plans derived from it (made once per call),
    and the sharing stage (see the module docstring)."""

    def __init__(self) -> None:
        # set by a server that attaches and detaches adapters only while unpatched (patch.trust_adapter_weights):
        # row-planned layers then keep their no_grad stacks without checking every slot's parameters per call
        self.adapters_frozen = False
        self.set(None)

    def set(self, plan: RowPlan | None, prefix_groups: int = 1, twin_groups: bool = False) -> None:
        """Start a call with ``plan`` (None ends it). ``prefix_groups``: the inputs are that many identical
        groups of consecutive samples. ``twin_groups``: groups 0 and 1 also have the same plan and differ
        only in the text condition (requires prefix_groups >= 2)."""
        twin = _twin_state(plan, prefix_groups) if plan is not None and twin_groups else None  # may raise
        self.plan = plan
        self.input_memo: dict = {}  # lora_linear's per-call memo of saved input rows
        self.prefix_groups = prefix_groups
        self.in_prefix = plan is not None and prefix_groups > 1
        self.twins = False
        self._twin = twin  # (group size, the plan's state restricted to groups 1..)

    def snapshot(self) -> dict:
        """The whole state, for ``restore`` (a checkpointed block replays its forward with it)."""
        return dict(self.__dict__)

    def restore(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def split(self) -> bool:
        """True when some samples need gradients and some do not (the case worth row-aware work)."""
        return self.plan is not None and bool(self.plan.layout.grad_samples) and bool(self.plan.layout.other_samples)

    def scaled_plan(self, scaling: tuple[float, ...]) -> RowPlan:
        """The current plan with each sample's scale times ``scaling[slot]`` (a LoRA layer's alpha / r per
        slot), made once per plan and scaling and kept on the plan (``RowPlan.build`` gives a training run the
        same plan every step): layers with the same scaling share it and what it caches."""
        cache = self.plan.__dict__.setdefault("_scaled", {})
        hit = cache.get(scaling)
        if hit is None:
            plan = self.plan
            host = plan.__dict__.get("_host_scales")
            if host is not None:  # from the host copy: one host-to-device copy, the layers' fast paths see the scales
                scaled = tuple(s * scaling[max(slot, 0)] for s, slot in zip(host, plan.layout.slots))
                hit = plan.with_scales(host_to_device(scaled, plan.scales.dtype, plan.scales.device), scaled)
            else:
                per_slot = host_to_device(scaling, plan.scales.dtype, plan.scales.device)
                hit = plan.with_scales(plan.scales * per_slot[plan.slots.clamp(min=0)])
            cache[scaling] = hit
        return hit

    def lora_layer_reached(self) -> None:
        """Rows with and without adapters diverge here; the twin groups do not."""
        if self.in_prefix:
            self.in_prefix = False
            self.twins = self._twin is not None

    def cross_attention_reached(self) -> None:
        """The captions enter here: every group diverges."""
        self.in_prefix = self.twins = False

    def prefix_shared(self, x: torch.Tensor, fn) -> torch.Tensor | None:
        """In the shared prefix, ``fn`` computed on the first of the identical groups of ``x`` ([N, ...],
        N = plan rows) and repeated for the others; None outside it."""
        if not self.in_prefix or x.shape[0] != len(self.plan):
            return None
        y = fn(x[: x.shape[0] // self.prefix_groups])
        return y.repeat(self.prefix_groups, *([1] * (y.dim() - 1)))

    def shares_twins(self, x: torch.Tensor) -> bool:
        return self.twins and x.shape[0] == len(self.plan)

    def twin_shared(self, x: torch.Tensor, fn) -> torch.Tensor:
        """``fn(x)`` for a module in the twins stage: ``fn`` runs on groups 1.. with the plan restricted to
        them, and group 0's output is group 1's. ``x`` is ``[N, ...]`` (N = plan rows)."""
        size, plan = self._twin
        view = x[size:]
        outer = self.snapshot()
        self.plan = plan
        self.in_prefix = self.twins = False
        try:
            y = fn(view)
        finally:
            self.restore(outer)
        return torch.cat([y[:size], y])

def _twin_state(plan: RowPlan, prefix_groups: int):
    if prefix_groups < 2:
        raise ValueError("twin_groups needs identical_groups >= 2")
    cache = plan.__dict__.setdefault("_twin", {})  # made once per plan (a training run reuses its plan)
    if prefix_groups not in cache:
        cache[prefix_groups] = _make_twin_state(plan, prefix_groups)
    return cache[prefix_groups]


def _make_twin_state(plan: RowPlan, prefix_groups: int):
    size = len(plan) // prefix_groups
    first, second = (plan.select(range(i * size, (i + 1) * size)) for i in (0, 1))
    if first.layout != second.layout or first.host_scales() != second.host_scales():
        raise ValueError("twin_groups: groups 0 and 1 of the row plan differ")
    return size, plan.select(range(size, len(plan)))
