"""Serving LoRA slots on a plain (peft-free) model: each targeted Linear / Conv2d gets preallocated stacked
slot tensors and a forward hook that adds the current segment plan's LoRA terms into its output.

Per targeted module (``SlotLora``): A ``[S, R, in]`` (Conv2d: ``[S, R, C*kh*kw]``) holding each slot's
down weights times its scale (the adapter's alpha / r for this module), B ``[S, out, R]``, and
``scales[S]`` (that scale, 0 for a slot whose adapter does not target the module; a record: it is already
in A), R the largest rank put into this module so far (smaller ranks zero-padded: exact). Putting an
adapter into a slot copies its tensors in; nothing is re-patched and no module is created, so a
request's adapter is an index in the plan. The hook (no grad) runs only while a ``SegmentPlan`` is set
on the shared ``SlotHolder`` and the plan uses one of the slots this module holds; otherwise the module
computes exactly what it did before.

What a call issues (docs/serving-engine.md, "What a call issues"): the ``SlotHolder`` packs the slots of
all its modules into one stacked buffer ``[S, P]`` per dtype and device (each module's A and B are views
of it), so the torch path gathers the plan's (segment, adapter) pairs for every module with ONE
``index_select`` per call (and one multiplication when the mix weights are not all 1); each module then
issues its two batched matmuls. With the scale already in A, no module spends a launch on coefficients.
"""

from __future__ import annotations

import torch

from catfast.ops.segmented import SegmentPlan, segmented_lora_conv2d_, segmented_lora_linear_


class _Bank:
    """The stacked slots of the modules of one (dtype, device, slot count): ``buf [S, P]`` = every
    module's A (flattened per slot), then every module's B; ``a_width`` = the A part's width."""

    def __init__(self, buf: torch.Tensor, a_width: int):
        self.buf, self.a_width = buf, a_width


class SlotHolder:
    """The segment plan of the current call (None between calls), shared by every ``SlotLora`` of a model,
    and the stacked buffers of their slots.

    The buffers are packed lazily: adding a module or growing its rank leaves the modules with tensors of
    their own until the next call that gathers (one copy of every slot, between the adapter loads and that
    call); putting an adapter into a slot writes into the packed views. ``version`` counts the changes to
    slot contents, so a plan reused across calls regathers after a put."""

    def __init__(self) -> None:
        self.plan: SegmentPlan | None = None
        self.layers: list[SlotLora] = []
        self.version = 0
        self._banks: dict[tuple, _Bank] = {}
        self._packed = True

    def changed(self, *, layout: bool = False) -> None:
        """Slot contents changed (and, with ``layout``, a module's shapes or the set of modules)."""
        self.version += 1
        if layout:
            self._packed = False

    def gathered(self, layer: SlotLora, plan: SegmentPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s A ``[G, K, R, in]`` and B ``[G, K, out, R]`` for the plan's (segment, adapter) pairs,
        mix weights in A: views of one gather of the plan's slots over every module of the holder, made
        once per plan (and again after a put)."""
        if not self._packed:
            self._pack()
        bank = self._banks[layer.bank_key]
        hit = plan.cached(("slot_bank", self, layer.bank_key), dict)
        if hit.get("version") != self.version:
            hit["version"], hit["rows"] = self.version, self._gather(bank, plan)
        rows, (g, k) = hit["rows"], plan.slots.shape
        a0, a1 = layer.a_span
        b0, b1 = layer.b_span
        return rows[:, :, a0:a1].view(g, k, *layer.a.shape[1:]), rows[:, :, b0:b1].view(g, k, *layer.b.shape[1:])

    @staticmethod
    def _gather(bank: _Bank, plan: SegmentPlan) -> torch.Tensor:
        """``[G, K, P]``: the plan's slots of the stacked buffer, mix weights in the A part."""
        device = bank.buf.device
        slots = plan.cached(("slots", device), lambda: plan.slots.to(device))
        rows = bank.buf.index_select(0, slots.reshape(-1)).view(*slots.shape, -1)
        if plan.common_weight != 1.0:
            weights = plan.cached(("weights", device), lambda: plan.weights.to(device))
            rows[:, :, : bank.a_width].mul_(weights.unsqueeze(-1))
        return rows

    def _pack(self) -> None:
        """Copy every module's slots into one stacked buffer per (dtype, device, slot count) and make the
        modules' A and B views of it."""
        groups: dict[tuple, list[SlotLora]] = {}
        for layer in self.layers:
            if layer.a is not None:
                groups.setdefault(layer.bank_key, []).append(layer)
        banks = {}
        for key, layers in groups.items():
            dtype, device, slots = key
            a_width = sum(layer.a[0].numel() for layer in layers)
            width = a_width + sum(layer.b[0].numel() for layer in layers)
            buf = torch.empty(slots, width, dtype=dtype, device=device)
            offset = 0
            for part in ("a", "b"):
                for layer in layers:
                    old = getattr(layer, part)
                    n = old[0].numel()
                    view = buf[:, offset : offset + n]
                    view.copy_(old.reshape(slots, n))
                    setattr(layer, part, view.view(old.shape))
                    setattr(layer, f"{part}_span", (offset, offset + n))
                    offset += n
            banks[key] = _Bank(buf, a_width)
        self._banks = banks
        self._packed = True


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
        self.a_span = self.b_span = (0, 0)  # where A and B lie in the holder's stacked buffer once packed
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=weight.device)
        self.held: set[int] = set()
        self._handle = module.register_forward_hook(self._hook)
        holder.layers.append(self)
        holder.changed(layout=True)

    @property
    def bank_key(self) -> tuple:
        return self.a.dtype, self.a.device, self.num_slots

    def remove(self) -> None:
        """Take the hook off (the module is as it was; the slot tensors are dropped)."""
        self._handle.remove()
        self.a = self.b = None
        if self in self.holder.layers:
            self.holder.layers.remove(self)
            self.holder.changed(layout=True)

    @torch.no_grad()
    def put(self, slot: int, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        """Copy one adapter layer (down ``[r, in...]``, up ``[out, r...]``, scale alpha/r) into ``slot``
        (A gets ``scale * down``, rounded once to the module's dtype)."""
        weight = self.module.weight
        exact = torch.promote_types(down.dtype, torch.float32)
        down = (down.reshape(down.shape[0], -1).to(weight.device, exact) * scale).to(weight.dtype)
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
        self.holder.changed()

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty ``slot`` (its scale 0 and tensors zero, so a stale plan can add nothing)."""
        if slot in self.held:
            self.held.discard(slot)
            self.scales[slot] = 0.0
            self.a[slot].zero_()
            self.b[slot].zero_()
            self.holder.changed()

    def _grow(self, rank: int) -> None:
        weight = self.module.weight
        a = torch.zeros(self.num_slots, rank, self.fan_in, dtype=weight.dtype, device=weight.device)
        b = torch.zeros(self.num_slots, self.out, rank, dtype=weight.dtype, device=weight.device)
        if self.a is not None:
            a[:, : self.rank] = self.a
            b[:, :, : self.rank] = self.b
        self.a, self.b, self.rank = a, b, rank
        self.holder.changed(layout=True)

    def _hook(self, module, args, out):
        plan = self.holder.plan
        if plan is None or self.held.isdisjoint(plan.slot_set):
            return None
        x = args[0]
        gather = lambda: self.holder.gathered(self, plan)  # noqa: E731 (called by the torch path of an equal-length plan)
        if isinstance(module, torch.nn.Conv2d):
            return segmented_lora_conv2d_(out, x, module, self.a, self.b, None, plan, gather=gather)
        return segmented_lora_linear_(out, x, self.a, self.b, None, plan, gather=gather)
