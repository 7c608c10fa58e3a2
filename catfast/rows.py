"""The row plan: for every sample (batch row) of one UNet call, which adapter slot it uses (or none),
with what scale, and whether it needs gradients (DESIGN.md, "The one idea").

Every row-aware LoRA layer reads the plan of the current call and computes, for sample n,
  Y[n] = X[n] W^T + b + scale[n] * (X[n] A[slot[n]]^T) B[slot[n]]^T     (no LoRA term where slot[n] = NO_ADAPTER)
and keeps activations / spends backward work only on the samples with needs_grad[n].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_ADAPTER = -1


@dataclass(frozen=True)
class RowPlan:
    """Per-sample adapter slot (int64, ``NO_ADAPTER`` for the base model), LoRA scale (fp32) and
    needs-grad flag (bool), each ``[N]`` on the device of the activations."""

    slots: torch.Tensor
    scales: torch.Tensor
    needs_grad: torch.Tensor

    @staticmethod
    def build(slots, scales=1.0, needs_grad=True, device=None) -> RowPlan:
        """A plan from Python values: ``slots`` a sequence of ints (``NO_ADAPTER`` = -1 for none);
        ``scales`` / ``needs_grad`` a scalar for all samples or one value per sample."""
        slots_t = torch.as_tensor(list(slots), dtype=torch.int64, device=device)
        n = slots_t.numel()
        scales_t = torch.as_tensor(scales, dtype=torch.float32, device=device).expand(n).contiguous()
        grad_t = torch.as_tensor(needs_grad, dtype=torch.bool, device=device).expand(n).contiguous()
        plan = RowPlan(slots_t, scales_t, grad_t)
        plan.validate()
        return plan

    @staticmethod
    def cat_step(batch: int, *, slot: int = 0, scale: float = 1.0, device=None) -> RowPlan:
        """The fused CAT layout of 3B rows: [trigger caption | stripped caption] on the adapter, with grad,
        then the teacher rows (base model, stripped caption) without grad."""
        return RowPlan.build(
            [slot] * (2 * batch) + [NO_ADAPTER] * batch,
            [scale] * (2 * batch) + [0.0] * batch,
            [True] * (2 * batch) + [False] * batch,
            device=device,
        )

    def __len__(self) -> int:
        return self.slots.numel()

    def validate(self, num_slots: int | None = None, batch: int | None = None) -> None:
        """Raise ValueError for inconsistent lengths, a slot < -1 or >= ``num_slots``, or a plan whose
        length differs from ``batch``."""
        n = self.slots.numel()
        if self.slots.dim() != 1 or self.scales.shape != (n,) or self.needs_grad.shape != (n,):
            raise ValueError(
                f"row plan fields must be 1-D of equal length, got slots {tuple(self.slots.shape)}, "
                f"scales {tuple(self.scales.shape)}, needs_grad {tuple(self.needs_grad.shape)}"
            )
        if batch is not None and n != batch:
            raise ValueError(f"row plan has {n} rows but the batch has {batch} samples")
        if n and int(self.slots.min()) < NO_ADAPTER:
            raise ValueError(f"row plan slot {int(self.slots.min())} is invalid (use {NO_ADAPTER} for no adapter)")
        if num_slots is not None and n and int(self.slots.max()) >= num_slots:
            raise ValueError(
                f"row plan uses adapter slot {int(self.slots.max())} but the layer has {num_slots} slot(s)"
            )

    def grad_samples(self) -> torch.Tensor:
        """Indices of the samples that need gradients, ascending (int64)."""
        return torch.nonzero(self.needs_grad, as_tuple=False).flatten()

    def select(self, samples: torch.Tensor) -> RowPlan:
        """The plan restricted to ``samples`` (an index tensor), in that order."""
        return RowPlan(self.slots[samples], self.scales[samples], self.needs_grad[samples])
