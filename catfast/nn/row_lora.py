"""Modules that hold adapter slots and call the row-planned LoRA op.

``RowLoraLayer`` stands in for one peft LoRA layer (a ``lora.Linear`` or a ``lora.Conv2d``; a k x k
one is kohya's LoCon) and shares every parameter with it: its ``base_layer``, ``lora_A`` and ``lora_B``
are the peft layer's own submodules, so parameter names, ``state_dict`` keys and optimizer state are
unchanged while patched. With a row plan set on its ``PlanHolder`` it computes

  y[n] = base(x[n]) + plan.scales[n] * scaling[slot] * B_slot(A_slot(x[n]))      slot = plan.slots[n]

(a slot whose adapter does not target this layer has scaling 0 and a zero rank-1 A and B here: adapters with
different targets share one plan)

with catfast.ops.lora.lora_linear (Linear: one launch) or catfast.ops.lora_conv.lora_conv2d (Conv2d);
with no plan it defers to the peft layer, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catfast.nn.plan_holder import PlanHolder
from catfast.ops.lora import lora_linear
from catfast.ops.lora_conv import lora_conv2d


class RowLoraLayer(torch.nn.Module):
    """Row-planned replacement of a peft LoRA Linear / Conv2d; adapter ``slot_names[i]`` is slot i."""

    def __init__(self, peft_layer: torch.nn.Module, slot_names: list[str], holder: PlanHolder):
        super().__init__()
        self.base_layer = peft_layer.base_layer
        self.lora_A = peft_layer.lora_A
        self.lora_B = peft_layer.lora_B
        self.slot_names = list(slot_names)
        self.is_conv = isinstance(self.base_layer, torch.nn.Conv2d)
        self.kernel = tuple(self.base_layer.kernel_size) if self.is_conv else None
        self.__dict__["peft_layer"] = peft_layer  # not a submodule: its parameters are already ours
        self.__dict__["holder"] = holder
        self._scaling = self._read_scaling()

    def _read_scaling(self) -> tuple[float, ...]:
        """Each slot's alpha / r here (0 for a slot whose adapter does not target this layer)."""
        peft = self.peft_layer
        self.__dict__["_targeted"] = any(name in peft.lora_A for name in self.slot_names)
        return tuple(float(peft.scaling[name]) if name in peft.lora_A else 0.0 for name in self.slot_names)

    def matches(self) -> bool:
        """Whether the peft layer still has the submodules this stand-in shares (a cached patch is put
        back only then)."""
        peft = self.peft_layer
        return all(self._modules[name] is getattr(peft, name, None) for name in ("base_layer", "lora_A", "lora_B"))

    def refresh(self) -> None:
        """Re-read the peft layer's scaling per slot (``set_adapters`` weights change it while unpatched)."""
        self.__dict__["_scaling"] = self._read_scaling()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.holder.plan
        if plan is None or self.peft_layer.disable_adapters:
            return self.peft_layer(x, *args, **kwargs)
        if len(plan) != x.shape[0]:  # slots were validated once when the plan was set (row_plan)
            raise ValueError(f"row plan has {len(plan)} rows but the batch has {x.shape[0]} samples")
        self.holder.lora_layer_reached()
        if self.holder.shares_twins(x):
            return self.holder.twin_shared(x, lambda rows: self.forward(rows, *args, **kwargs))
        if not plan.layout.adapter_samples or not self._targeted:  # base rows only (the teacher call), or no
            return self.base_layer(x)  # slot's adapter targets this layer: the frozen layer, nothing else
        lora_a, lora_b = self._stacked()
        if lora_a.dtype != x.dtype:  # fp32 LoRA parameters on a bf16/fp16 UNet (peft's cast_training_params)
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        row_plan = self.holder.scaled_plan(self._scaling)
        weight = self.base_layer.weight
        if self.is_conv:
            # 1x1 ones too: as tokens through lora_linear they needed an NHWC copy, and that copy (not the
            # NCHW tensor the norm before saves) was saved: small UNet, LoRA on every conv, 1 thread:
            # 97.5 MB saved and 697 ms a step that way, 93.2 MB and 663 ms this way
            lora_a = lora_a.view(*lora_a.shape[:2], *weight.shape[1:])
            return lora_conv2d(x, self.base_layer, lora_a, lora_b, row_plan)
        return lora_linear(
            x,
            weight,
            self.base_layer.bias,
            lora_a,
            lora_b,
            row_plan,
            validate_plan=False,
            input_memo=self.holder.input_memo,
        )

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``[S, r, in]`` and B ``[S, out, r]`` over the slots (ranks zero-padded to the largest); views
        of the parameters when there is one slot, so gradients land on them directly. Under no_grad (sampling,
        serving) the stacks are kept until a parameter changes (its storage or version): stacking 16 resident
        adapters on every call cost a served DiT 757 launching ops a step against 217 merged. With
        ``holder.adapters_frozen`` (a server's promise) the kept stacks are used without that check."""
        present = [name for name in self.slot_names if name in self.lora_A]
        if len(present) == len(self.slot_names) == 1:
            name = present[0]
            return self.lora_A[name].weight.flatten(1).unsqueeze(0), self.lora_B[name].weight.flatten(1).unsqueeze(0)
        key = None
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # a compiled graph stacks in-graph
            cached = self.__dict__.get("_stack_cache")
            if cached is not None and self.holder.adapters_frozen:  # the key's check is O(slots) per call
                return cached[1]
            params = [m[name].weight for name in present for m in (self.lora_A, self.lora_B)]
            key = tuple((id(p), p.data_ptr(), p._version) for p in params)
            cached = self.__dict__.get("_stack_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        stacks = self._stack(present)
        if key is not None:
            self.__dict__["_stack_cache"] = (key, stacks)
        return stacks

    def _stack(self, present: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        like_a, like_b = self.lora_A[present[0]].weight.flatten(1), self.lora_B[present[0]].weight.flatten(1)
        downs, ups = [], []
        for name in self.slot_names:  # an untargeting slot: zero rank-1 factors (its scaling is 0 as well)
            present_here = name in self.lora_A
            downs.append(self.lora_A[name].weight.flatten(1) if present_here else like_a.new_zeros(1, like_a.shape[1]))
            ups.append(self.lora_B[name].weight.flatten(1) if present_here else like_b.new_zeros(like_b.shape[0], 1))
        r = max(d.shape[0] for d in downs)
        downs = [F.pad(d, (0, 0, 0, r - d.shape[0])) for d in downs]
        ups = [F.pad(u, (0, r - u.shape[1])) for u in ups]
        return torch.stack(downs), torch.stack(ups)

    def extra_repr(self) -> str:
        return f"slots={self.slot_names}, conv={self.kernel}"
