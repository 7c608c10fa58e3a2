"""Serving LoRA slots on a plain (peft-free) model: each targeted Linear / Conv2d gets preallocated stacked
slot tensors and a forward hook that adds the current segment plan's LoRA terms into its output.

Per targeted module (``SlotLora``): A ``[S, R, in]`` (Conv2d: ``[S, R, C*kh*kw]``), B ``[S, out, R]``
and ``scales[S]`` (the adapter's alpha / r for this module, 0 for a slot whose adapter does not target
it), R the largest rank put into this module so far (smaller ranks zero-padded: exact). Putting an
adapter into a slot copies its tensors in; nothing is re-patched and no module is created, so a
request's adapter is an index in the plan. The hook (no grad) runs only while a ``SegmentPlan`` is set
on the shared ``SlotHolder`` and the plan uses one of the slots this module holds; otherwise the module
computes exactly what it did before.
"""

from __future__ import annotations

import torch

from catfast.ops.segmented import SegmentPlan, segmented_lora_conv2d_, segmented_lora_linear_


class SlotHolder:
    """The segment plan of the current call (None between calls), shared by every ``SlotLora`` of a model."""

    def __init__(self) -> None:
        self.plan: SegmentPlan | None = None


class SlotLora:
    """The adapter slots of one Linear / Conv2d and the hook that applies them."""

    def __init__(self, module: torch.nn.Module, num_slots: int, holder: SlotHolder):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise TypeError(f"slots go on Linear / Conv2d modules, not {type(module).__name__}")
        if isinstance(module, torch.nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise ValueError(f"Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r}")
        self.module, self.holder, self.num_slots = module, holder, num_slots
        weight = module.weight
        self.fan_in, self.out = weight[0].numel(), weight.shape[0]
        self.rank = 0
        self.a = self.b = None
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=weight.device)
        self.held: set[int] = set()
        self._handle = module.register_forward_hook(self._hook)

    def remove(self) -> None:
        """Take the hook off (the module is as it was; the slot tensors are dropped)."""
        self._handle.remove()
        self.a = self.b = None

    @torch.no_grad()
    def put(self, slot: int, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        """Copy one adapter layer (down ``[r, in...]``, up ``[out, r...]``, scale alpha/r) into ``slot``."""
        weight = self.module.weight
        down = down.reshape(down.shape[0], -1).to(weight.device, weight.dtype)
        up = up.reshape(up.shape[0], -1).to(weight.device, weight.dtype)
        r = down.shape[0]
        if down.shape[1] != self.fan_in or up.shape != (self.out, r):
            raise ValueError(f"LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not fit {tuple(weight.shape)}")
        if r > self.rank:
            self._grow(r)
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :r] = down
        self.b[slot, :, :r] = up
        self.scales[slot] = scale
        self.held.add(slot)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty ``slot`` (its scale 0 and tensors zero, so a stale plan can add nothing)."""
        if slot in self.held:
            self.held.discard(slot)
            self.scales[slot] = 0.0
            self.a[slot].zero_()
            self.b[slot].zero_()

    def _grow(self, rank: int) -> None:
        weight = self.module.weight
        a = torch.zeros(self.num_slots, rank, self.fan_in, dtype=weight.dtype, device=weight.device)
        b = torch.zeros(self.num_slots, self.out, rank, dtype=weight.dtype, device=weight.device)
        if self.a is not None:
            a[:, : self.rank] = self.a
            b[:, :, : self.rank] = self.b
        self.a, self.b, self.rank = a, b, rank

    def _hook(self, module, args, out):
        plan = self.holder.plan
        if plan is None or self.held.isdisjoint(plan.slot_set):
            return None
        x = args[0]
        if isinstance(module, torch.nn.Conv2d):
            return segmented_lora_conv2d_(out, x, module, self.a, self.b, self.scales, plan)
        return segmented_lora_linear_(out, x, self.a, self.b, self.scales, plan)
