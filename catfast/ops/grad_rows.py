"""Keep the backward pass of a row-planned call to the samples that need gradients.

Three pieces, used together by the fused CAT pass (and measured in `catfast bench train-step`):
- ``keep_grad_rows(plan)``: saved-tensor hooks that store only the grad samples'
  rows of every batch-major activation autograd saves, and give back a full-size tensor (zeros in the
  other rows) in backward. Reference-mode CAT saves nothing for the teacher (it runs under no_grad);
  this makes the one-call fused pass save no more than that.
- ``frozen_conv2d`` / ``frozen_linear``: frozen-weight conv and linear over all rows in one launch, whose
  backward computes dX for the grad samples only (and saves no activation at all).
- ``split_rows(fn, plan, *tensors)``: runs ``fn`` on the grad samples with autograd and on the
  others under no_grad (two launches; used for attention, where a row-aware backward would have to
  recompute the forward).
Rows of one sample are consecutive along dim 0 (batch-major), as in every UNet tensor. Which samples
need gradients comes from the plan's host layout (catfast.rows), so none of this reads the device.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F

from catfast.ops.conv import conv2d_forward, conv2d_input
from catfast.rows import RowPlan

ROWS_ONLY = "_catfast_rows_only"  # attribute marking a saved tensor that already holds only grad rows


def take_samples(t: torch.Tensor, samples: torch.Tensor, run: tuple[int, int] | None) -> torch.Tensor:
    """Rows ``samples`` of ``t`` along dim 0 (one row per sample): a view for a run, else a gather."""
    return t[run[0] : run[1]] if run is not None else t.index_select(0, samples)


def gather_rows(t: torch.Tensor, samples: torch.Tensor, run: tuple[int, int] | None, num_samples: int) -> torch.Tensor:
    """A new tensor with the rows of ``samples`` (t.shape[0] = num_samples x rows per sample)."""
    k = t.shape[0] // num_samples
    if run is not None and run[1] - run[0] == num_samples:
        return t  # every sample's rows: nothing to leave out, no copy
    if run is not None:
        return t[run[0] * k : run[1] * k].clone()  # keeps t's strides (transposed views stay fast)
    return t.index_select(0, sample_rows(samples, k))


def scatter_rows(kept: torch.Tensor, shape, samples: torch.Tensor, run: tuple[int, int] | None, num_samples: int):
    """The inverse of ``gather_rows``: a ``shape`` tensor with ``kept`` in the rows of ``samples``, zeros elsewhere."""
    k = shape[0] // num_samples
    if run is not None:
        if run[0] == 0 and run[1] == num_samples:
            return kept
        full, rows = zeros_outside(kept, shape, run, num_samples)  # one copy and one fill
        rows.copy_(kept)
        return full
    return kept.new_zeros(shape).index_copy_(0, sample_rows(samples, k), kept)


def zeros_outside(like: torch.Tensor, shape, run: tuple[int, int], num_samples: int):
    """(full, rows): a new ``shape`` tensor (``like``'s dtype and device), zero outside the samples of
    ``run``, and the view of their rows, still to be written (an op can write its result there)."""
    k = shape[0] // num_samples
    lo, hi = run[0] * k, run[1] * k
    full = like.new_empty(shape)
    full[:lo].zero_()
    full[hi:].zero_()
    return full, full[lo:hi]


def sample_rows(samples: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """Flat dim-0 indices of ``samples`` when each sample owns ``rows_per_sample`` consecutive rows."""
    offsets = torch.arange(rows_per_sample, device=samples.device)
    return (samples[:, None] * rows_per_sample + offsets[None, :]).flatten()


_active = threading.local()  # .stack: (token, exclude) of the open keep_grad_rows contexts, innermost last


def _open_contexts() -> list:
    if not hasattr(_active, "stack"):
        _active.stack = []
    return _active.stack


@contextlib.contextmanager
def sub_batch_rows(plan: RowPlan):
    """Within an open ``keep_grad_rows``: for computations on a sub-batch of the call's samples (whose
    dim 0 no longer maps onto the call's samples), keep the grad rows of that sub-batch instead (``plan``
    is the sub-batch's), with the same exclusions; the enclosing context saves what this one keeps as it
    is. Without an open context: nothing."""
    stack = _open_contexts()
    if not stack:
        yield
        return
    with keep_grad_rows(plan, exclude=stack[-1][1]):
        yield


@contextlib.contextmanager
def keep_grad_rows(plan: RowPlan, exclude: set[int] = frozenset()):
    """Saved-tensor hooks: a saved float tensor whose dim 0 is a multiple of the plan's length keeps only
    the rows of the plan's grad samples; storages in ``exclude`` (parameters) and tensors marked ``ROWS_ONLY``
    are saved as they are. Each distinct saved view is copied once, however many ops save it.

    Assumes what autograd saves with such a dim 0 is batch-major, each sample's rows consecutive: true
    of diffusers UNets (checked by the fused-vs-reference gradient tests, and on SD1.5 shapes by
    `catfast bench train-step --model sd15`); a layout that breaks it would show there as a mismatch."""
    # view key -> (weak reference to the saved tensor, its kept rows). The key is only trusted while
    # that tensor is alive: once it dies, the allocator may hand the same address to a new tensor.
    memo: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
    outer_pack, outer_unpack = _enclosing_hooks()
    grad_samples, num_samples, run = plan.grad_samples(), len(plan), plan.layout.grad_run
    token, stack = object(), _open_contexts()

    def keep(t: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, tuple]:
        if (
            stack[-1][0] is not token  # a sub_batch_rows context inside this one decided already
            or t.dim() == 0
            or not t.is_floating_point()
            or t.shape[0] % num_samples
            or getattr(t, ROWS_ONLY, False)
            or t.untyped_storage().data_ptr() in exclude
        ):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        hit = memo.get(key)
        if hit is not None and hit[0]() is not None:
            return hit[1], tuple(t.shape)
        kept = gather_rows(t, grad_samples, run, num_samples)
        memo[key] = (weakref.ref(t), kept)
        return kept, tuple(t.shape)

    def pack(t: torch.Tensor):
        kept = keep(t)
        if isinstance(kept, tuple):
            return outer_pack(kept[0]), kept[1]
        return outer_pack(kept), None

    def unpack(packed):
        stored, shape = packed
        kept = outer_unpack(stored)
        if shape is None:
            return kept
        return scatter_rows(kept, shape, grad_samples, run, num_samples)

    stack.append((token, exclude))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        stack.pop()
        memo.clear()


def _enclosing_hooks():
    """The saved-tensor hooks active around ours (identity when none), so that ours compose with them:
    what we keep is handed on to the enclosing pack hook (e.g. a byte counter, or CPU offloading)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks if hooks is not None else (lambda t: t, lambda t: t)


class _FrozenRowsFunction(torch.autograd.Function):
    """y = op(x) on every row; dX only for the grad samples' rows (weights are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_args, plan):
        ctx.conv_args, ctx.x_shape = conv_args, x.shape
        ctx.grad_samples, ctx.run = plan.grad_samples(), plan.layout.grad_run
        ctx.save_for_backward(weight)
        if conv_args is None:
            return F.linear(x, weight, bias)
        return conv2d_forward(x, weight, bias, *conv_args)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        index, run = ctx.grad_samples, ctx.run
        dy_g = take_samples(dy, index, run)
        if ctx.conv_args is None:
            dx_g = dy_g @ weight
        else:
            stride, padding, dilation, groups = ctx.conv_args
            shape = (index.numel(), *ctx.x_shape[1:])
            dx_g = conv2d_input(shape, weight, dy_g, stride, padding, dilation, groups)
        return scatter_rows(dx_g.to(dy.dtype), ctx.x_shape, index, run, ctx.x_shape[0]), None, None, None, None


def autocast_inputs(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """``(x, *tensors)`` cast to the autocast dtype when autocast is on for x's device, as torch's own
    linear / conv would cast them (None stays None); unchanged otherwise. The row-planned autograd
    Functions call this first: autocast does not reach inside a custom Function's inputs."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(kind)
    cast = [t if t is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype) for t in tensors]
    for before, after in zip(tensors, cast):
        if after is not before:  # a weight's copy: keep_grad_rows must save it whole, not as sample rows
            setattr(after, ROWS_ONLY, True)
    return (x if not x.is_floating_point() or x.dtype == dtype else x.to(dtype), *cast)


def frozen_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, plan: RowPlan) -> torch.Tensor:
    """``conv(x)`` ([N, C, H, W], one launch) whose backward spends work only on the plan's grad samples."""
    if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
        return conv(x)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    return _FrozenRowsFunction.apply(*autocast_inputs(x, conv.weight, conv.bias), args, plan)


def frozen_linear(x: torch.Tensor, linear: torch.nn.Linear, plan: RowPlan) -> torch.Tensor:
    """``linear(x)`` ([N, ..., in], one launch) whose backward spends work only on the plan's grad
    samples (x's first dim is the sample; rows of a sample are its inner dims)."""
    return _FrozenRowsFunction.apply(*autocast_inputs(x, linear.weight, linear.bias), None, plan)


def split_rows(fn, plan: RowPlan, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` for batch-major tensors (one row per sample), with autograd only for the plan's
    grad samples' rows. Consecutive runs are sliced, keeping the inputs' strides: on the 2-thread
    dev CPU, gathering attention's transposed q/k/v into contiguous copies made SDPA 2.3x slower.
    The grad rows are cloned (strides preserved) so what ``fn`` saves does not pin the other rows."""
    grad_samples, other_samples = plan.grad_samples(), plan.other_samples()
    grad_run, other_run = plan.layout.grad_run, plan.layout.other_run
    grad_in = (take_samples(t, grad_samples, grad_run) for t in tensors)
    grad_out = fn(*(t.clone() if grad_run is not None else t for t in grad_in))
    with torch.no_grad():
        other_out = fn(*(take_samples(t, other_samples, other_run) for t in tensors))
    if grad_run is not None and other_run is not None and grad_run[1] == other_run[0]:
        return torch.cat([grad_out, other_out])
    out = grad_out.new_empty((grad_out.shape[0] + other_out.shape[0], *grad_out.shape[1:]))
    out = out.index_copy(0, other_samples, other_out)
    return out.index_copy(0, grad_samples, grad_out)
