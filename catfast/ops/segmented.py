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

    def coefficients(self, scales: torch.Tensor) -> torch.Tensor:
        """``[G, K]`` per-(segment, adapter) coefficients w * scales[slot] for one layer."""
        return self.weights.to(scales.dtype) * scales[self.slots]


def _mixed(lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of ``[G, K]`` slot mixes as virtual slots: A ``[G, K*R, in]``, B ``[G, out, K*R]``."""
    g, k = slots.shape
    r = lora_a.shape[1]
    flat = slots.reshape(-1)
    a = lora_a.index_select(0, flat).view(g, k * r, lora_a.shape[2])
    b = lora_b.index_select(0, flat).view(g, k, lora_b.shape[1], r).permute(0, 2, 1, 3).reshape(g, -1, k * r)
    return a, b


def segmented_lora_linear_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    plan: SegmentPlan,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Add the plan's LoRA terms into ``y`` (the base Linear's output for ``x``) in place; returns ``y``.
    x ``[N, ..., in]``, y ``[N, ..., out]``, N = ``plan.rows``. No autograd."""
    if not plan.segments:
        return y
    if x.shape[0] != plan.rows or y.shape[0] != plan.rows:
        raise ValueError(f"segment plan has {plan.rows} rows but the batch has {x.shape[0]}")
    backend = choose("segmented_lora_linear", x.device, x.dtype, requested=backend)
    with torch.no_grad():
        coef = plan.coefficients(scales.to(x.dtype))
        if backend == "triton":  # the custom op catfast::segmented_lora_linear_ under torch.compile (ops/library.py)
            from catfast.kernels.segmented_lora import plan_tiles  # lazy: triton

            if not y.is_contiguous():
                raise ValueError("the Triton segmented LoRA adds into a contiguous output")
            call_segmented_lora_linear_(y, x, lora_a, lora_b, coef, plan.slots, *plan_tiles(plan, x))
            return y
        return _linear_torch_(y, x, lora_a, lora_b, coef, plan)


def _linear_torch_(y, x, lora_a, lora_b, coef, plan) -> torch.Tensor:
    r, fan_in, out = lora_a.shape[1], x.shape[-1], y.shape[-1]
    if plan.uniform and y.is_contiguous():
        lo, hi = plan.span
        g = len(plan.segments)
        a, b = _mixed(lora_a, lora_b, plan.slots)
        xg = x[lo:hi].reshape(g, -1, fan_in)
        t = torch.bmm(xg, a.transpose(1, 2))  # [G, rows*tokens, K*R]
        t.mul_(coef.repeat_interleave(r, dim=1).unsqueeze(1))
        y[lo:hi].view(g, -1, out).baddbmm_(t, b.transpose(1, 2))
        return y
    for i, seg in enumerate(plan.segments):
        a, b = _mixed(lora_a, lora_b, plan.slots[i : i + 1])
        xs = x[seg.start : seg.stop].reshape(-1, fan_in)
        t = (xs @ a[0].T).mul_(coef[i].repeat_interleave(r))
        ys = y[seg.start : seg.stop]
        if ys.is_contiguous():
            ys.view(-1, out).addmm_(t, b[0].T)
        else:
            ys += (t @ b[0].T).view(ys.shape)
    return y


def segmented_lora_conv2d_(
    y: torch.Tensor,
    x: torch.Tensor,
    conv: torch.nn.Conv2d,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    plan: SegmentPlan,
) -> torch.Tensor:
    """Conv2d twin of ``segmented_lora_linear_``: A ``[S, R, C*kh*kw]`` is a conv with the base layer's
    kernel, stride, padding and dilation (kohya LoCon), B ``[S, out, R]`` a 1x1 conv. x ``[N, C, H, W]``,
    y ``[N, out, H', W']``. Torch only (cuDNN/oneDNN convolutions): equal-length segments as one grouped
    conv pair (segment g = channel group g), else one conv pair per segment."""
    if not plan.segments:
        return y
    if x.shape[0] != plan.rows or y.shape[0] != plan.rows:
        raise ValueError(f"segment plan has {plan.rows} rows but the batch has {x.shape[0]}")
    choose("segmented_lora_conv2d", x.device, x.dtype)  # torch only: checks CATFAST_BACKEND, forces nothing
    with torch.no_grad():
        coef = plan.coefficients(scales.to(x.dtype))
        r = lora_a.shape[1]
        kernel = (x.shape[1], *conv.kernel_size)
        if plan.uniform and len(plan.segments) > 1:
            return _conv_grouped_(y, x, conv, lora_a, lora_b, coef, plan, kernel)
        for i, seg in enumerate(plan.segments):
            a, b = _mixed(lora_a, lora_b, plan.slots[i : i + 1])
            a = (a[0] * coef[i].repeat_interleave(r)[:, None]).view(-1, *kernel)
            t = F.conv2d(x[seg.start : seg.stop], a, None, conv.stride, conv.padding, conv.dilation)
            y[seg.start : seg.stop] += F.conv2d(t, b[0][:, :, None, None])
    return y


def _conv_grouped_(y, x, conv, lora_a, lora_b, coef, plan, kernel) -> torch.Tensor:
    """Equal-length segments as one grouped conv pair: segment g's rows become channel group g."""
    lo, hi = plan.span
    g, r = len(plan.segments), lora_a.shape[1]
    m = (hi - lo) // g
    a, b = _mixed(lora_a, lora_b, plan.slots)  # [G, K*R, C*kh*kw], [G, out, K*R]
    kr = a.shape[1]
    a = (a * coef.repeat_interleave(r, dim=1)[:, :, None]).reshape(g * kr, *kernel)
    xs = x[lo:hi].reshape(g, m, *x.shape[1:]).transpose(0, 1).reshape(m, g * x.shape[1], *x.shape[2:])
    t = F.conv2d(xs, a, None, conv.stride, conv.padding, conv.dilation, groups=g)
    u = F.conv2d(t, b.reshape(g * b.shape[1], kr, 1, 1), groups=g)  # [m, G*out, H', W']
    y[lo:hi] += u.view(m, g, *y.shape[1:]).transpose(0, 1).reshape(hi - lo, *y.shape[1:])
    return y
