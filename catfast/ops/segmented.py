"""Segmented, no-grad, mixed-adapter LoRA for serving: the rows of one call are grouped into contiguous
segments, each with its own adapter mix, and each segment's LoRA term is added in place into the base
layer's output (no scatter).

Semantics (``catfast.reference.segmented`` is the spec), for every segment g = rows [start, stop) with
mix ((slot_1, w_1), ..., (slot_K, w_K)) and every row n of it:

  y[n] += sum_k  w_k * scales[slot_k] * (x[n] @ A[slot_k]^T) @ B[slot_k]^T

Rows in no segment (the base-only rows) get no LoRA work at all. A mix of K adapters is one "virtual
slot": the concatenation along the rank of its adapters' A and B, with the per-adapter coefficient on
each rank, which is exactly the sum of the K LoRA terms. Shapes: x ``[N, ..., in]`` (Linear) or
``[N, C, H, W]`` (Conv2d), y the base output, A ``[S, R, in]`` (Conv2d: ``[S, R, C*kh*kw]``), B
``[S, out, R]``, scales ``[S]`` (a layer's alpha / r per slot, 0 for slots it does not hold); mixed
ranks are zero-padded to R, which is exact.

Backends: "torch" (batched matmuls when the segments have equal length; every serving batch of
requests with one image each is like that) and "triton" (``catfast.kernels.segmented_lora``, Linear
only), chosen by ``catfast.backends.choose`` (ops ``segmented_lora_linear`` and, torch only,
``segmented_lora_conv2d``).

What a layer issues (issue 23, "Serving gets the same treatment"): with ``scales=None`` (A already holds
each slot's scale, as ``catfast.nn.slot_lora`` stores it) and the plan's (segment, adapter) pairs gathered
once per plan for every layer (``gather``, ``SlotHolder``'s stacked slot buffers), the torch path of an
equal-length plan is ``bmm`` + ``baddbmm_`` per adapter of the largest mix (2 launches per layer for one
adapter per request, whatever the number of distinct adapters), the Triton path its two kernels; the
plan's device tensors (slots, int32 slots, weights) are made once per plan, and nothing reads the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from catfast.backends import choose, register, torch_probe, triton_probe
from catfast.ops.library import call_segmented_lora_linear_
from catfast.rows import cached_property

register("segmented_lora_linear", "segmented mixed-adapter LoRA Linear of serving (no grad, in place)",
         triton=triton_probe, torch=torch_probe)  # fmt: skip
register("segmented_lora_conv2d", "segmented mixed-adapter LoRA Conv2d of serving (no grad, in place)",
         torch=torch_probe)  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a call, all with the adapter mix ``mix`` ((slot, weight), ...)."""

    start: int
    stop: int
    mix: tuple[tuple[int, float], ...]


class SegmentPlan:
    """The segments of one no-grad UNet call with ``rows`` rows (made on the host, once per call).

    Segments with an empty mix are dropped; the others must not overlap. ``slots`` / ``weights`` are
    ``[G, K]`` device tensors (K = the largest mix, shorter mixes padded with slot 0 and weight 0)."""

    def __init__(self, rows: int, segments: Sequence[Segment], device=None):
        segs = sorted((s for s in segments if s.mix), key=lambda s: s.start)
        for a, b in zip(segs, segs[1:]):
            if b.start < a.stop:
                raise ValueError(f"segments overlap: rows {a.start}-{a.stop} and {b.start}-{b.stop}")
        for s in segs:
            if not 0 <= s.start < s.stop <= rows:
                raise ValueError(f"segment rows {s.start}-{s.stop} outside the call's {rows} rows")
            if any(slot < 0 for slot, _ in s.mix):
                raise ValueError(f"segment rows {s.start}-{s.stop}: negative slot in {s.mix}")
        self.rows = rows
        self.segments = tuple(segs)
        self.k = max((len(s.mix) for s in segs), default=0)
        self.slot_set = frozenset(slot for s in segs for slot, _ in s.mix)
        pad = [list(s.mix) + [(0, 0.0)] * (self.k - len(s.mix)) for s in segs]
        self.slots = torch.tensor([[p[0] for p in row] for row in pad], dtype=torch.int64, device=device)
        self.weights = torch.tensor([[p[1] for p in row] for row in pad], dtype=torch.float32, device=device)
        lengths = {s.stop - s.start for s in segs}
        contiguous = all(a.stop == b.start for a, b in zip(segs, segs[1:]))
        # equal-length, back-to-back segments: the whole LoRA term is two batched matmuls
        self.uniform = bool(segs) and len(lengths) == 1 and contiguous
        self.device = device

    def __len__(self) -> int:
        return self.rows

    @cached_property
    def span(self) -> tuple[int, int]:
        """(first row, stop row) covered by the segments."""
        return self.segments[0].start, self.segments[-1].stop

    @cached_property
    def common_weight(self) -> float | None:
        """The weight every (segment, adapter) pair has, padding included (None when they differ): with 1.0
        the gathered slots need no multiplication."""
        values = {w for s in self.segments for _, w in s.mix}
        if any(len(s.mix) < self.k for s in self.segments):
            values.add(0.0)
        return values.pop() if len(values) == 1 else None

    @cached_property
    def slots_i32(self) -> torch.Tensor:
        """``slots`` as int32 (the Triton kernels' index type), made once per plan."""
        return self.slots.to(torch.int32)

    def cached(self, key, make):
        """``make()`` once per plan and ``key``: what a call derives from its plan (device tensors, gathered
        slots) is made once per call, not once per layer."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def coefficients(self, scales: torch.Tensor | None) -> torch.Tensor:
        """``[G, K]`` per-(segment, adapter) coefficients w * scales[slot] for one layer; the weights alone
        (no launch) when ``scales`` is None (the slots' A already holds each slot's scale)."""
        if scales is None:
            return self.weights
        return self.weights.to(scales.dtype) * scales[self.slots]


def gather_pairs(lora_a, lora_b, plan: SegmentPlan, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's (segment, adapter) pairs from one layer's slots, coefficients folded into A: A
    ``[G, K, R, in]``, B ``[G, K, out, R]`` (what ``SlotHolder.gathered`` makes for every layer at once)."""
    g, k = plan.slots.shape
    flat = plan.slots.reshape(-1)
    a = lora_a.index_select(0, flat).view(g, k, *lora_a.shape[1:])
    a.mul_(coef.to(a.dtype).view(g, k, 1, 1))
    return a, lora_b.index_select(0, flat).view(g, k, *lora_b.shape[1:])


def segmented_lora_linear_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | None,
    plan: SegmentPlan,
    *,
    backend: str | None = None,
    gather=None,
) -> torch.Tensor:
    """Add the plan's LoRA terms into ``y`` (the base Linear's output for ``x``) in place; returns ``y``.
    x ``[N, ..., in]``, y ``[N, ..., out]``, N = ``plan.rows``. No autograd.

    ``scales``: ``[S]``, or None when ``lora_a`` already holds each slot's scale (no per-layer launch for
    the coefficients). ``gather``: None, or a callable returning ``gather_pairs``' result for these slots
    with the mix weights folded in (and the scales, which must then be None), made once per plan for
    every layer; the torch path of an equal-length plan calls it instead of gathering here."""
    if not plan.segments:
        return y
    if x.shape[0] != plan.rows or y.shape[0] != plan.rows:
        raise ValueError(f"segment plan has {plan.rows} rows but the batch has {x.shape[0]}")
    backend = choose("segmented_lora_linear", x.device, x.dtype, requested=backend)
    with torch.no_grad():
        if backend == "triton":  # the custom op catfast::segmented_lora_linear_ under torch.compile (ops/library.py)
            from catfast.kernels.segmented_lora import plan_tiles  # lazy: triton

            if not y.is_contiguous():
                raise ValueError("the Triton segmented LoRA adds into a contiguous output")
            coef = _coef(plan, scales, x)
            call_segmented_lora_linear_(y, x, lora_a, lora_b, coef, plan.slots_i32, *plan_tiles(plan, x))
            return y
        return _linear_torch_(y, x, lora_a, lora_b, scales, plan, gather)


def _linear_torch_(y, x, lora_a, lora_b, scales, plan, gather) -> torch.Tensor:
    fan_in, out = x.shape[-1], y.shape[-1]
    if plan.uniform and y.is_contiguous():  # two batched matmuls per adapter of the largest mix
        lo, hi = plan.span
        g = len(plan.segments)
        a, b = gather() if gather is not None else gather_pairs(lora_a, lora_b, plan, _coef(plan, scales, x))
        xg = x[lo:hi].reshape(g, -1, fan_in)
        yg = y[lo:hi].view(g, -1, out)
        for k in range(plan.k):
            yg.baddbmm_(torch.bmm(xg, a[:, k].transpose(1, 2)), b[:, k].transpose(1, 2))
        return y
    coef = None if scales is None else _coef(plan, scales, x)
    for i, seg in enumerate(plan.segments):  # one matmul pair per adapter of each segment, on slot views
        xs = x[seg.start : seg.stop].reshape(-1, fan_in)
        ys = y[seg.start : seg.stop]
        for k, (slot, w) in enumerate(seg.mix):
            t = xs @ lora_a[slot].T
            if coef is not None:  # the scale is on the device: one more launch (not the slots' case)
                t.mul_(coef[i, k])
                w = 1.0
            if ys.is_contiguous():
                ys.view(-1, out).addmm_(t, lora_b[slot].T, alpha=w)
            else:
                u = t @ lora_b[slot].T
                ys += (u if w == 1.0 else u.mul_(w)).view(ys.shape)
    return y


def _coef(plan: SegmentPlan, scales: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return plan.coefficients(None if scales is None else scales.to(x.dtype))


def segmented_lora_conv2d_(
    y: torch.Tensor,
    x: torch.Tensor,
    conv: torch.nn.Conv2d,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | None,
    plan: SegmentPlan,
    *,
    gather=None,
) -> torch.Tensor:
    """Conv2d twin of ``segmented_lora_linear_``: A ``[S, R, C*kh*kw]`` is a conv with the base layer's
    kernel, stride, padding and dilation (kohya LoCon), B ``[S, out, R]`` a 1x1 conv. x ``[N, C, H, W]``,
    y ``[N, out, H', W']``; ``scales`` and ``gather`` as there. Torch only (cuDNN/oneDNN convolutions):
    equal-length segments as one grouped conv pair (segment g = channel group g), else one conv pair per
    adapter of each segment."""
    if not plan.segments:
        return y
    if x.shape[0] != plan.rows or y.shape[0] != plan.rows:
        raise ValueError(f"segment plan has {plan.rows} rows but the batch has {x.shape[0]}")
    choose("segmented_lora_conv2d", x.device, x.dtype)  # torch only: checks CATFAST_BACKEND, forces nothing
    with torch.no_grad():
        kernel = (x.shape[1], *conv.kernel_size)
        geometry = (conv.stride, conv.padding, conv.dilation)
        if plan.uniform and len(plan.segments) > 1:
            a, b = gather() if gather is not None else gather_pairs(lora_a, lora_b, plan, _coef(plan, scales, x))
            return _conv_grouped_(y, x, geometry, a, b, plan, kernel)
        coef = None if scales is None else _coef(plan, scales, x)
        for i, seg in enumerate(plan.segments):
            for k, (slot, w) in enumerate(seg.mix):
                t = F.conv2d(x[seg.start : seg.stop], lora_a[slot].reshape(-1, *kernel), None, *geometry)
                if coef is not None or w != 1.0:
                    t.mul_(w if coef is None else coef[i, k])
                y[seg.start : seg.stop] += F.conv2d(t, lora_b[slot][:, :, None, None])
    return y


def _conv_grouped_(y, x, geometry, a, b, plan, kernel) -> torch.Tensor:
    """Equal-length segments as one grouped conv pair: segment g's rows become channel group g (a, b:
    ``gather_pairs``' ``[G, K, R, C*kh*kw]`` and ``[G, K, out, R]``, coefficients in a)."""
    lo, hi = plan.span
    g, k, r = a.shape[:3]
    m = (hi - lo) // g
    a = a.reshape(g * k * r, *kernel)
    b = b.permute(0, 2, 1, 3).reshape(g * b.shape[2], k * r, 1, 1)  # group g: [out, K*R]
    xs = x[lo:hi].reshape(g, m, *x.shape[1:]).transpose(0, 1).reshape(m, g * x.shape[1], *x.shape[2:])
    t = F.conv2d(xs, a, None, *geometry, groups=g)
    u = F.conv2d(t, b, groups=g)  # [m, G*out, H', W']
    y[lo:hi] += u.view(m, g, *y.shape[1:]).transpose(0, 1).reshape(hi - lo, *y.shape[1:])
    return y
