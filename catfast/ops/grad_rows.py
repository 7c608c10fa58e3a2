"""Keep the backward pass of a row-planned call to the samples that need gradients.

Two pieces, used by the fused CAT pass (and measured in `catfast bench train-step`):
- ``frozen_conv2d`` / ``frozen_linear``: frozen-weight conv and linear over all rows in one launch, whose
  backward computes dX for the grad samples only (and saves no activation at all).
- ``split_rows(fn, plan, *tensors)``: runs ``fn`` on the grad samples with autograd and on the
  others under no_grad (two launches; used for attention, where a row-aware backward would have to
  recompute the forward).
Rows of one sample are consecutive along dim 0 (batch-major), as in every UNet tensor. Which samples
need gradients comes from the plan's host layout (catfast.rows), so none of this reads the device.

What the other ops of a one-call fused step save (norms, activations) is saved whole: saved-tensor hooks
that kept only the grad samples' rows cost a copy when packed and a zero-padded copy when unpacked, 2061
of the 4707 launching ops of a fused step of ``sd15-skeleton`` (``catfast bench train-step``), and 11 graph
breaks under torch.compile. The teacher-first layout saves nothing for the teacher rows by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catfast.ops.conv import conv2d_forward, conv2d_input
from catfast.ops.library import tracing
from catfast.rows import RowPlan


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
    """The inverse of ``gather_rows``: a ``shape`` tensor with ``kept`` in the rows of ``samples``, zeros elsewhere.
    A run is one ``cat`` with broadcast zeros (one launch; a zero-filled tensor and a copy into it were three)."""
    k = shape[0] // num_samples
    if run is not None:
        if run[0] == 0 and run[1] == num_samples:
            return kept
        zero = zero_scalar(kept)
        parts = [zero.expand(run[0] * k, *shape[1:]), kept.reshape(-1, *shape[1:]),
                 zero.expand((num_samples - run[1]) * k, *shape[1:])]  # fmt: skip
        return torch.cat([p for p in parts if p.shape[0]])
    return kept.new_zeros(shape).index_copy_(0, sample_rows(samples, k), kept)


_ZEROS: dict[tuple, torch.Tensor] = {}


def zero_scalar(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero of ``like``'s dtype on its device, made once (``expand`` it: a view, no launch); a fresh one
    while torch.compile or a fake-tensor trace runs (a real cached tensor cannot enter those)."""
    if tracing(like):
        return like.new_zeros(())
    key = (like.dtype, like.device)
    hit = _ZEROS.get(key)
    if hit is None:
        hit = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return hit


def sample_rows(samples: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """Flat dim-0 indices of ``samples`` when each sample owns ``rows_per_sample`` consecutive rows."""
    offsets = torch.arange(rows_per_sample, device=samples.device)
    return (samples[:, None] * rows_per_sample + offsets[None, :]).flatten()


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
