"""The row-planned LoRA linear as an autograd Function, with its backend choice, and the same layer as one
``torch.library`` custom op, ``catfast::lora_linear`` (``lora_linear_op``: what ``torch.compile`` sees; its
autograd recomputes the rank-r ``x A^T`` of the grad rows instead of saving it).

Backends: "triton" (catfast/kernels/lora_gemm.py; CUDA, or the CPU interpreter under
TRITON_INTERPRET=1) and "torch" (pure-torch math with the same row-aware saving). The choice is made
per call by ``catfast.backends.choose``: ``CATFAST_BACKEND`` forces one (``ext`` is an error: this op
has none); otherwise triton on CUDA, torch elsewhere.

What backward keeps (docs/design.md, "No backward work for the teacher rows"): the input
rows and the rank-r product T = X A^T of the samples with ``needs_grad`` only, plus references to
the weights. Backward computes dX only for those rows (zeros elsewhere) and dA/dB per adapter slot
from those rows only. The base weight and bias are frozen (no dW/db).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor

from catfast.backends import choose, get, register, torch_probe, triton_probe
from catfast.ops.grad_rows import (
    autocast_inputs,
    gather_rows,
    sample_rows,
    scatter_rows,
    take_samples,
)
from catfast.ops.library import call_lora_gemm, call_segment_outer, flatten_plan, host_plan
from catfast.rows import NO_ADAPTER, RowPlan

register("lora_linear", "row-planned LoRA Linear (forward GEMM + rank-r term, row-aware backward)",
         triton=triton_probe, torch=torch_probe)  # fmt: skip
BACKENDS = get("lora_linear").backends
_NO_CONTEXT = contextlib.nullcontext()


def choose_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """``catfast.backends.choose`` for this op: ``backend`` or ``CATFAST_BACKEND`` when given (a clear
    error when it cannot run), else triton on CUDA and torch on the CPU."""
    return choose("lora_linear", x.device, x.dtype, requested=backend)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: RowPlan,
    *,
    backend: str | None = None,
    validate_plan: bool = True,
    input_memo: dict | None = None,
) -> torch.Tensor:
    """``lora_linear_ref`` semantics (see catfast/reference/lora.py) with row-aware backward.

    Shapes: x ``[N, ..., in]``, weight ``[out, in]``, bias ``[out]``/None, lora_a ``[S, r, in]``,
    lora_b ``[S, out, r]``, plan of length N. Checks everything before any kernel runs;
    ``validate_plan=False`` skips the slot-range check (a device sync on GPU) for callers that
    validated the plan once per UNet call. ``input_memo``: a dict that lives for one UNet call, so
    that layers reading the same input tensor (to_q / to_k / to_v) save its grad rows once.
    """
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    _check(x, weight, bias, lora_a, lora_b, plan, validate_plan)
    backend = choose_backend(x, backend)
    # inputs cast above; the rank-r terms stay fp32 inside. Entered only under autocast: its enter, exit and
    # autocast-cache clearing were about a sixth of the op's host time on a small layer (cProfile, 1 thread)
    with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else _NO_CONTEXT:
        if torch.compiler.is_compiling():  # one opaque custom op for dynamo (lora_linear_op, below)
            return torch.ops.catfast.lora_linear(x, weight, bias, lora_a, lora_b, *flatten_plan(plan), backend)
        if not (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)):
            # nothing to differentiate (the teacher call, sampling): the forward alone, nothing saved
            return forward_rows(x, weight, bias, lora_a, lora_b, plan, backend, False)[0].view(*x.shape[:-1], -1)
        return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, plan, backend, input_memo)


def _check(x, weight, bias, lora_a, lora_b, plan: RowPlan, validate_plan: bool) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be [N, ..., in], got shape {tuple(x.shape)}")
    if validate_plan:
        plan.validate(num_slots=lora_a.shape[0], batch=x.shape[0])
    elif len(plan) != x.shape[0]:
        raise ValueError(f"row plan has {len(plan)} rows but the batch has {x.shape[0]} samples")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features but weight is {tuple(weight.shape)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[2] != in_f or lora_b.shape[1] != out_f:
        raise ValueError(
            f"lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not fit weight "
            f"{tuple(weight.shape)} (expected [S, r, {in_f}] and [S, {out_f}, r])"
        )
    if lora_a.shape[0] != lora_b.shape[0] or lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} disagree on slots or rank")
    tensors = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b, "plan.slots": plan.slots}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name in ("weight", "lora_a", "lora_b", "bias"):
        if name in tensors and tensors[name].dtype != x.dtype:
            raise ValueError(f"{name} is {tensors[name].dtype} but x is {x.dtype}")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the base weight and bias must be frozen (requires_grad=False); only LoRA A/B train")


class LoraLinearFunction(torch.autograd.Function):
    """Row-planned LoRA linear; saves and differentiates only the rows of samples with needs_grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, plan: RowPlan, backend: str, input_memo):
        n = x.shape[0]
        grad_samples, run = plan.grad_samples(), plan.layout.grad_run
        need_low = grad_samples.numel() > 0 and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        y2, low_rows, x2, rows = forward_rows(x, weight, bias, lora_a, lora_b, plan, backend, need_low)
        ctx.rows, ctx.num_samples, ctx.x_shape, ctx.backend = rows, n, x.shape, backend
        ctx.plan, ctx.grad_samples, ctx.run = plan.grad_plan, grad_samples, run
        x_rows = _input_rows(x, x2, grad_samples, run, input_memo)
        ctx.save_for_backward(x_rows, low_rows, weight, lora_a, lora_b)
        return y2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_rows, low_rows, weight, lora_a, lora_b = ctx.saved_tensors
        want = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx, da, db = backward_rows(dy, x_rows, low_rows, weight, lora_a, lora_b, ctx.plan, ctx.grad_samples, ctx.run,
                                   ctx.rows, ctx.num_samples, ctx.x_shape, ctx.backend, *want)  # fmt: skip
        return dx, None, None, da, db, None, None, None


def forward_rows(x, weight, bias, lora_a, lora_b, plan: RowPlan, backend: str, need_low: bool):
    """The forward GEMM of ``lora_linear`` on every row: ``(y [M, out], T = X A^T of the grad samples' rows
    [M_g, r] fp32 or None, x as [M, in], rows per sample)`` with M = N x rows per sample."""
    n, in_f = x.shape[0], x.shape[-1]
    x2 = x.reshape(-1, in_f).contiguous()
    rows = x2.shape[0] // n if n else 0
    if backend == "triton":  # the custom op catfast::lora_gemm under torch.compile (ops/library.py)
        y2, low = call_lora_gemm(x2, weight, bias, lora_a, lora_b, plan.slots, plan.scales, rows, need_low)
        run = plan.layout.grad_run
        if not need_low:
            low = None
        elif run is not None:  # T of the grad samples' rows: a view (rank r: pinning all rows costs little)
            low = low[run[0] * rows : run[1] * rows]
        else:
            low = gather_rows(low, plan.grad_samples(), run, n)
    else:
        y2, low = _torch_gemm(x2, weight, bias, lora_a, lora_b, plan, rows, store_low=need_low)
    return y2, low, x2, rows


def backward_rows(dy, x_rows, low_rows, weight, lora_a, lora_b, plan: RowPlan, grad_samples, run, rows: int,
                  num_samples: int, x_shape, backend: str, want_x: bool, want_a: bool, want_b: bool):  # fmt: skip
    """``lora_linear``'s backward from what its forward kept: ``(dX or None, dA or None, dB or None)``.
    ``plan`` is the grad samples' plan (``RowPlan.grad_plan``), ``x_rows`` / ``low_rows`` their rows of
    X ``[M_g, in]`` and T ``[M_g, r]``; dX is zero outside the grad samples."""
    if grad_samples.numel() == 0:
        return (dy.new_zeros(x_shape) if want_x else None, torch.zeros_like(lora_a) if want_a else None,
                torch.zeros_like(lora_b) if want_b else None)  # fmt: skip
    one = one_adapter(plan) if backend != "triton" and run is not None and lora_a.shape[0] == 1 else None
    if (
        one is not None
        and one[2:] == (0, len(plan))  # every grad sample on the adapter
        and dy.dtype == weight.dtype == lora_a.dtype == lora_b.dtype == x_rows.dtype == torch.float32
    ):
        return _one_adapter_backward(dy, x_rows, low_rows, weight, lora_a[0], lora_b[0], one[1], run, rows, num_samples,
                                     x_shape, want_x, want_a, want_b)  # fmt: skip
    # run: a view when the grad samples are one run (the CAT layout puts them first)
    dy_rows = take_samples(dy.reshape(num_samples, rows, -1), grad_samples, run)
    dy_rows = dy_rows.reshape(-1, dy.shape[-1]).contiguous()
    dx = up_low = None
    if want_x:  # dX = dY W + s (dY B) A, and U = dY B for dA, in one launch
        flat_shape = (num_samples * rows, weight.shape[1])
        if backend == "triton":
            dx_rows, up_low = call_lora_gemm(dy_rows, weight.t(), None, lora_b.transpose(1, 2), lora_a.transpose(1, 2),
                                             plan.slots, plan.scales, rows, want_a or want_b)  # fmt: skip
        else:
            b_as_a, a_as_b = lora_b.transpose(1, 2), lora_a.transpose(1, 2)
            dx_rows, up_low = _torch_gemm(dy_rows, weight.t(), None, b_as_a, a_as_b, plan, rows,
                                          store_low=want_a or want_b)  # fmt: skip
        dx = scatter_rows(dx_rows, flat_shape, grad_samples, run, num_samples)
        dx = dx.view(x_shape)
    elif want_a or want_b:  # x needs no gradient (to_k/to_v on the text embeddings): only U = dY B
        up_low = _lora_low(dy_rows, lora_b.transpose(1, 2), plan, rows)
    da = db = None
    if want_a or want_b:
        da, db = _adapter_grads(x_rows, dy_rows, low_rows, up_low, plan, rows, lora_a.shape[0], backend)
        da = da.to(lora_a.dtype) if want_a else None
        db = db.to(lora_b.dtype) if want_b else None
    return dx, da, db


def _one_adapter_backward(dy, x_rows, low_rows, weight, a, b, scale: float, run: tuple[int, int], rows: int,
                          num_samples: int, x_shape, want_x: bool, want_a: bool, want_b: bool):  # fmt: skip
    """``backward_rows`` for one adapter ``a`` [r, in] / ``b`` [out, r] on every grad sample (one run), fp32: U = dY B
    (one GEMM), dX = dY W + s U A written into its rows of the result (two), dA = s U^T X and dB = s dY^T T (one
    each, ``beta=0`` so nothing is read from the weights they are shaped like): 5 launches and the zero fill of
    the other samples' dX, where the general path issued 20 (``launch_ops``)."""
    total, lo, hi = num_samples * rows, run[0] * rows, run[1] * rows
    dy_rows = dy.reshape(total, -1)[lo:hi]
    u = dy_rows @ b if want_x or want_a else None  # [M_g, r]
    dx = None
    if want_x:
        dx = dy.new_empty((total, weight.shape[1]))
        into = dx[lo:hi]
        torch.mm(dy_rows, weight, out=into)
        into.addmm_(u, a, alpha=scale)
        _zero_other_rows(dx, lo, hi)
        dx = dx.view(x_shape)
    da = torch.addmm(a, u.t(), x_rows, beta=0, alpha=scale).unsqueeze(0) if want_a else None
    db = torch.addmm(b, dy_rows.t(), low_rows, beta=0, alpha=scale).unsqueeze(0) if want_b else None
    return dx, da, db


def _zero_other_rows(t: torch.Tensor, lo: int, hi: int) -> None:
    """Zero ``t``'s rows outside ``[lo, hi)`` (no launch for an empty side)."""
    if lo:
        t[:lo].zero_()
    if hi < t.shape[0]:
        t[hi:].zero_()


def _input_rows(x, x2, grad_samples, run, memo: dict | None) -> torch.Tensor:
    """The grad samples' rows of ``x`` (as ``x2`` [M, in]). One run (the CAT layouts) is a view: a copy of the
    rows was a launch per input of every step (65 of a fused step of ``sd15-skeleton``) to leave the teacher
    rows unsaved, which the norms and activations between the layers save anyway. Scattered samples are
    gathered once per input tensor and call: to_q, to_k and to_v read the same tensor."""
    if run is not None:
        k = x2.shape[0] // x.shape[0]
        return x2[run[0] * k : run[1] * k]
    key = (id(x), x._version)
    hit = memo.get(key) if memo is not None else None
    if hit is not None and hit[0]() is x:
        return hit[1]
    kept = gather_rows(x2, grad_samples, run, x.shape[0])
    if memo is not None:
        memo[key] = (weakref.ref(x), kept)
    return kept


def one_adapter(plan: RowPlan) -> tuple[int, float, int, int] | None:
    """``(slot, scale, first, stop)`` when the plan's samples with an adapter are one run ``[first, stop)`` on one
    slot with one scale known on the host (a training step: every adapter sample on the trained adapter), else
    None. Such a plan's LoRA term is two plain GEMMs on a view of the rows, the scale an ``alpha``: no gather,
    no per-sample scale tensor, no copies (``catfast bench train-step``'s ``launch_ops``). Cached on the plan:
    every layer asks it, forward and backward."""
    cached = plan.__dict__.get("_one_adapter", _UNSET)
    if cached is _UNSET:
        cached = plan.__dict__["_one_adapter"] = _one_adapter(plan)
    return cached


_UNSET = object()


def _one_adapter(plan: RowPlan) -> tuple[int, float, int, int] | None:
    layout = plan.layout
    run, scales = layout.adapter_run, plan.__dict__.get("_host_scales")
    if run is None or len(layout.slots_used) != 1 or scales is None:
        return None
    first, stop = run
    if any(scales[i] != scales[first] for i in range(first + 1, stop)):
        return None
    return layout.slots_used[0], scales[first], first, stop


def _torch_gemm(x2, weight, bias, lora_a, lora_b, plan: RowPlan, rows: int, *, store_low: bool):
    """Torch twin of kernels.lora_gemm: (X W^T + b + s (X A^T) B^T, T = X A^T of the grad samples' rows, fp32,
    or None), the LoRA terms computed for the samples with an adapter only. weight [out, in]; lora_a
    [S, r, in]; lora_b [S, out, r]. The rank-r product is accumulated in fp32."""
    y = torch.nn.functional.linear(x2, weight, bias)
    layout = plan.layout
    if not layout.adapter_samples:
        return y, (x2.new_zeros((len(layout.grad_samples) * rows, lora_a.shape[1]), dtype=torch.float32)
                   if store_low else None)  # fmt: skip
    one = one_adapter(plan)
    if (
        one is not None
        and y.dtype == x2.dtype == lora_a.dtype == lora_b.dtype == torch.float32
        and (not store_low or layout.grad_samples == layout.adapter_samples)
    ):
        slot, scale, first, stop = one
        low = x2[first * rows : stop * rows] @ lora_a[slot].t()  # [M_a, r]
        y[first * rows : stop * rows].addmm_(low, lora_b[slot].t(), alpha=scale)
        return y, low if store_low else None
    return y, _torch_lora_rows(y, x2, lora_a, lora_b, plan, rows, store_low)


def _torch_lora_rows(y, x2, lora_a, lora_b, plan: RowPlan, rows: int, store_low: bool) -> torch.Tensor | None:
    """Adds every adapter sample's LoRA term into ``y`` (any slots, scales and order) and returns T = X A^T of
    the grad samples' rows (fp32; zeros for those without an adapter) when ``store_low``."""
    n = plan.slots.numel()
    with_adapter, run = plan.index(plan.layout.adapter_samples), plan.layout.adapter_run
    xs = take_samples(x2.view(n, rows, -1), with_adapter, run)
    scales = take_samples(plan.scales, with_adapter, run).view(-1, 1, 1)
    used = plan.layout.slots_used
    if len(used) == 1:  # one adapter: plain matmuls, no per-sample copies of A and B
        a, b = lora_a[used[0]].float(), lora_b[used[0]].float()
        low_sel = (xs.float() @ a.t()).view(xs.shape[0], rows, -1)  # [n_sel, rows, r]
        delta = (low_sel * scales) @ b.t()
    else:
        slots = take_samples(plan.slots, with_adapter, run)
        low_sel = torch.bmm(xs.float(), lora_a[slots].float().transpose(1, 2))
        delta = torch.bmm(low_sel * scales, lora_b[slots].float().transpose(1, 2))
    y3 = y.view(n, rows, -1)
    if run is not None:  # one run, added in place (index_add_ ran as scatter_add: 18% of a profiled fused step)
        y3[run[0] : run[1]].add_(delta.to(y.dtype))
    else:
        y3.index_add_(0, with_adapter, delta.to(y.dtype))
    if not store_low:
        return None
    low = torch.zeros((x2.shape[0], lora_a.shape[1]), device=x2.device, dtype=torch.float32)
    low.view(n, rows, -1).index_copy_(0, with_adapter, low_sel)
    return gather_rows(low, plan.grad_samples(), plan.layout.grad_run, n)


def _lora_low(x2, lora_a, plan: RowPlan, rows: int) -> torch.Tensor:
    """X @ A[slot]^T per sample, fp32 ``[M, r]`` (zeros for samples without an adapter)."""
    n = plan.slots.numel()
    idx = plan.slots.clamp(min=0)
    low = torch.bmm(x2.view(n, rows, -1).float(), lora_a[idx].float().transpose(1, 2))
    return (low * (plan.slots != NO_ADAPTER).view(n, 1, 1)).reshape(n * rows, -1)


def _adapter_grads(x_rows, dy_rows, low_rows, up_low, plan: RowPlan, rows: int, num_slots: int, backend: str):
    """dA [S, r, in] and dB [S, out, r] (fp32) from the grad rows, summed per adapter slot."""
    layout = plan.layout
    order = layout.adapter_order
    bounds = [0] * (num_slots + 1)  # sample bounds of each slot's group in that order
    for i in order:
        bounds[layout.slots[i] + 1] += 1
    for s in range(num_slots):
        bounds[s + 1] += bounds[s]
    index = plan.index(order)
    row_scale = plan.scales[index].repeat_interleave(rows).float()
    if order == tuple(range(len(plan))):
        x_s, dy_s, low_s, up_s = x_rows, dy_rows, low_rows, up_low  # already grouped by slot (one adapter)
    else:
        rows_index = sample_rows(index, rows)
        x_s, dy_s = x_rows.index_select(0, rows_index), dy_rows.index_select(0, rows_index)
        low_s, up_s = low_rows.index_select(0, rows_index), up_low.index_select(0, rows_index)
    if backend == "triton":  # the custom op catfast::segment_outer under torch.compile (ops/library.py)
        # bounds in samples made once per plan (a host-to-device copy syncs), scaled on the device: rows is
        # symbolic under torch.compile's dynamic shapes and cannot key the plan's cache
        seg = plan.index(bounds) * rows
        return call_segment_outer(up_s, x_s, row_scale, seg), call_segment_outer(dy_s, low_s, row_scale, seg)
    da = torch.zeros((num_slots, up_s.shape[1], x_s.shape[1]), device=x_rows.device, dtype=torch.float32)
    db = torch.zeros((num_slots, dy_s.shape[1], low_s.shape[1]), device=x_rows.device, dtype=torch.float32)
    for s in range(num_slots):
        lo, hi = bounds[s] * rows, bounds[s + 1] * rows
        if hi > lo:
            scaled = row_scale[lo:hi, None]
            da[s] = (up_s[lo:hi].float() * scaled).t() @ x_s[lo:hi].float()
            db[s] = (dy_s[lo:hi].float() * scaled).t() @ low_s[lo:hi].float()
    return da, db


# -- the same LoRA Linear as one custom op (catfast::lora_linear), what torch.compile sees ---------------


@torch.library.custom_op("catfast::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, slots: Tensor, scales: Tensor,
    slots_host: list[int], needs_grad_host: list[bool], backend: str,
) -> Tensor:  # fmt: skip
    plan = host_plan(slots, scales, slots_host, needs_grad_host)
    y2, _, _, _ = forward_rows(x, weight, bias, lora_a, lora_b, plan, backend, False)
    return y2.view(*x.shape[:-1], weight.shape[0])


@lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, slots, scales, slots_host, needs_grad_host, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _lora_linear_setup(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, slots, scales, slots_host, needs_grad_host, backend = inputs
    # x whole (its grad samples' rows are a view in backward); T = x A^T is recomputed in backward (rank r)
    # rather than saved
    ctx.save_for_backward(x, weight, lora_a, lora_b, slots, scales)
    ctx.slots_host, ctx.needs_grad_host, ctx.backend = list(slots_host), list(needs_grad_host), backend


def _lora_linear_backward(ctx, dy):
    x, weight, lora_a, lora_b, slots, scales = ctx.saved_tensors
    plan = host_plan(slots, scales, ctx.slots_host, ctx.needs_grad_host)
    n = x.shape[0]
    grad_samples, run = plan.grad_samples(), plan.layout.grad_run
    rows = x.numel() // x.shape[-1] // n if n else 0
    want = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    x_rows = low_rows = None
    if grad_samples.numel():
        x_rows = gather_rows(x.reshape(-1, x.shape[-1]), grad_samples, run, n)
        low_rows = _lora_low(x_rows, lora_a, plan.grad_plan, rows) if want[1] or want[2] else None
    dx, da, db = backward_rows(dy, x_rows, low_rows, weight, lora_a, lora_b, plan.grad_plan, grad_samples, run, rows,
                               n, x.shape, ctx.backend, *want)  # fmt: skip
    return dx, None, None, da, db, None, None, None, None, None


lora_linear_op.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup)
