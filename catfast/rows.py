"""The row plan: for every sample (batch row) of one UNet call, which adapter slot it uses (or none),
with what scale, and whether it needs gradients (docs/design.md, "The one idea").

Every row-aware LoRA layer reads the plan of the current call and computes, for sample n,
  Y[n] = X[n] W^T + b + scale[n] * (X[n] A[slot[n]]^T) B[slot[n]]^T     (no LoRA term where slot[n] = NO_ADAPTER)
and keeps activations / spends backward work only on the samples with needs_grad[n].

Which samples go where is decided on the host, once per plan (``RowPlan.layout``): reading the device
to find it in every layer cost 894 host reads per fused CAT step of the small UNet, each one a device
synchronisation on a GPU. A plan built with ``RowPlan.build`` or derived from one knows its layout
without reading the device at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NO_ADAPTER = -1
PLAN_CACHE = 256  # built plans kept for reuse (RowPlan.build)


_built: dict[tuple, RowPlan] = {}  # RowPlan.build's cache, oldest first


class cached_property:  # noqa: N801 (named as the functools one it replaces)
    """``functools.cached_property`` without its lock: on Python 3.11 that one enters an ``RLock``, which
    torch.compile cannot trace (7 graph breaks per compiled fused CAT step of the tiny UNet, measured).
    Plans are made and read by one thread. The value is stored in the instance ``__dict__`` under the
    property's name, as functools does (``RowPlan._seed`` relies on that)."""

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


def run_of(samples: Sequence[int]) -> tuple[int, int] | None:
    """(start, stop) when ``samples`` is an ascending run of consecutive indices (the CAT layout puts the
    grad samples first), else None. Slicing such a run is a view: no gather, strides kept."""
    if not samples:
        return None
    first, last = samples[0], samples[-1]
    if last - first + 1 != len(samples):
        return None
    return (first, last + 1) if all(b == a + 1 for a, b in zip(samples, samples[1:])) else None


def host_to_device(values, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A tensor of host ``values`` on ``device`` without a host sync: on CUDA the values go through pinned
    memory with a non-blocking copy (a copy from pageable memory waits for the stream, a sync per plan field
    and index, each layer's plan included)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def tensor_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor ``t`` (fresh, not written again by the caller) on ``device`` without a host sync: on CUDA
    through pinned memory with a non-blocking copy, as ``host_to_device``; elsewhere ``t.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _per_sample(value, n: int | None, cast) -> list:
    """``value`` (a sequence, tensor or scalar) as a list of ``n`` host values."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple, range)):
        return [cast(v) for v in value]
    if n is None:
        raise ValueError(f"row plan slots must be a sequence of ints, got {value!r}")
    return [cast(value)] * n


@dataclass(frozen=True)
class RowLayout:
    """The host copy of a plan's slots and needs-grad flags, and the sample groups layers derive from it
    (tuples of sample indices, ascending)."""

    slots: tuple[int, ...]
    needs_grad: tuple[bool, ...]

    @cached_property
    def grad_samples(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.needs_grad) if g)

    @cached_property
    def other_samples(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.needs_grad) if not g)

    @cached_property
    def adapter_samples(self) -> tuple[int, ...]:
        """The samples with an adapter (slot != NO_ADAPTER)."""
        return tuple(i for i, s in enumerate(self.slots) if s != NO_ADAPTER)

    @cached_property
    def grad_run(self) -> tuple[int, int] | None:
        """``run_of(grad_samples)``."""
        return run_of(self.grad_samples)

    @cached_property
    def other_run(self) -> tuple[int, int] | None:
        """``run_of(other_samples)``."""
        return run_of(self.other_samples)

    @cached_property
    def adapter_run(self) -> tuple[int, int] | None:
        """``run_of(adapter_samples)``."""
        return run_of(self.adapter_samples)

    @cached_property
    def adapter_order(self) -> tuple[int, ...]:
        """The samples with an adapter, grouped by slot (ascending), each group in sample order."""
        return tuple(sorted(self.adapter_samples, key=lambda i: self.slots[i]))

    @cached_property
    def slots_used(self) -> tuple[int, ...]:
        """The distinct adapter slots of the plan, ascending."""
        return tuple(sorted({self.slots[i] for i in self.adapter_samples}))

    @cached_property
    def by_slot(self) -> tuple[tuple[int, bool, tuple[int, ...]], ...]:
        """(slot, needs_grad, samples) for every non-empty group of samples with an adapter, by slot."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for i in self.adapter_samples:
            groups.setdefault((self.slots[i], self.needs_grad[i]), []).append(i)
        order = sorted(groups, key=lambda key: (key[0], not key[1]))  # by slot, grad samples first
        return tuple((slot, grad, tuple(groups[slot, grad])) for slot, grad in order)

    def subset(self, samples: Sequence[int]) -> RowLayout:
        return RowLayout(tuple(self.slots[i] for i in samples), tuple(self.needs_grad[i] for i in samples))


@dataclass(frozen=True)
class RowPlan:
    """Per-sample adapter slot (int64, ``NO_ADAPTER`` for the base model), LoRA scale (fp32) and
    needs-grad flag (bool), each ``[N]`` on the device of the activations. Immutable: the host layout
    and index tensors are cached on first use, so make a new plan rather than writing into these."""

    slots: torch.Tensor
    scales: torch.Tensor
    needs_grad: torch.Tensor

    @staticmethod
    def build(slots, scales=1.0, needs_grad=True, device=None) -> RowPlan:
        """A plan from Python values: ``slots`` a sequence of ints (``NO_ADAPTER`` = -1 for none);
        ``scales`` / ``needs_grad`` a scalar for all samples or one value per sample.

        Plans are immutable, so the same values give back the same plan (the ``PLAN_CACHE`` newest plans are
        kept), with the device tensors it made and cached: a training run builds the same plan every step, and
        its tensors are made once per run instead of per step (and a captured CUDA graph reads the same ones)."""
        host_slots = tuple(_per_sample(slots, None, int))
        n = len(host_slots)
        grads, host_scales = _per_sample(needs_grad, n, bool), _per_sample(scales, n, float)
        if not len(grads) == len(host_scales) == n:
            raise ValueError(
                f"row plan fields need one value per sample: {n} slots, {len(host_scales)} scales, "
                f"{len(grads)} needs_grad"
            )
        key = (host_slots, tuple(host_scales), tuple(grads), torch.device(device) if device is not None else None)
        hit = _built.pop(key, None)
        if hit is None:
            hit = RowPlan._build(host_slots, host_scales, grads, device)
        _built[key] = hit  # the newest last
        while len(_built) > PLAN_CACHE:
            del _built[next(iter(_built))]
        return hit

    @staticmethod
    def _build(host_slots, host_scales, grads, device) -> RowPlan:
        plan = RowPlan(
            host_to_device(host_slots, torch.int64, device),
            host_to_device(host_scales, torch.float32, device),
            host_to_device(grads, torch.bool, device),
        )
        plan._seed(RowLayout(host_slots, tuple(grads)), tuple(host_scales))
        plan.validate()
        return plan

    def __len__(self) -> int:
        return self.slots.numel()

    @cached_property
    def layout(self) -> RowLayout:
        """Host copy of slots and needs-grad (one device read, once, for a plan not built or derived on
        the host)."""
        return RowLayout(tuple(self.slots.tolist()), tuple(self.needs_grad.tolist()))

    def host_scales(self) -> tuple[float, ...]:
        """Host copy of the scales (one device read, once, for a plan not built or derived on the host)."""
        if "_host_scales" not in self.__dict__:
            self.__dict__["_host_scales"] = tuple(self.scales.tolist())
        return self.__dict__["_host_scales"]

    def _seed(self, layout: RowLayout, scales: tuple[float, ...] | None = None) -> None:
        self.__dict__["layout"] = layout  # what cached_property stores; frozen dataclasses allow it
        if scales is not None:
            self.__dict__["_host_scales"] = scales

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
        if n and min(self.layout.slots) < NO_ADAPTER:
            raise ValueError(f"row plan slot {min(self.layout.slots)} is invalid (use {NO_ADAPTER} for no adapter)")
        if num_slots is not None and n and max(self.layout.slots) >= num_slots:
            raise ValueError(
                f"row plan uses adapter slot {max(self.layout.slots)} but the layer has {num_slots} slot(s)"
            )

    def index(self, samples: Sequence[int]) -> torch.Tensor:
        """``samples`` as an int64 index tensor on the plan's device, made once per plan and group."""
        cache = self.__dict__.setdefault("_indices", {})
        key = tuple(samples)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = host_to_device(key, torch.int64, self.slots.device)
        return hit

    def grad_samples(self) -> torch.Tensor:
        """Indices of the samples that need gradients, ascending (int64)."""
        return self.index(self.layout.grad_samples)

    def other_samples(self) -> torch.Tensor:
        """Indices of the samples that need no gradients, ascending (int64)."""
        return self.index(self.layout.other_samples)

    def select(self, samples: torch.Tensor | Sequence[int]) -> RowPlan:
        """The plan restricted to ``samples`` (an index tensor, or host ints: then no device read), in that
        order."""
        host = None if isinstance(samples, torch.Tensor) else tuple(samples)
        index = self.index(host) if host is not None else samples
        plan = RowPlan(self.slots[index], self.scales[index], self.needs_grad[index])
        if host is not None:
            scales = self.__dict__.get("_host_scales")
            plan._seed(self.layout.subset(host), None if scales is None else tuple(scales[i] for i in host))
        return plan

    @cached_property
    def grad_plan(self) -> RowPlan:
        """The plan restricted to its grad samples."""
        return self.select(self.layout.grad_samples)

    def with_scales(self, scales: torch.Tensor, host_scales: tuple[float, ...] | None = None) -> RowPlan:
        """The same samples with other scales (``host_scales``: their host copy, when known); shares the layout
        and the index tensors."""
        plan = RowPlan(self.slots, scales, self.needs_grad)
        plan._seed(self.layout, host_scales)
        plan.__dict__["_indices"] = self.__dict__.setdefault("_indices", {})
        return plan
