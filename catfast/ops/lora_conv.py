"""The row-planned LoRA Conv2d with a k x k down projection (kohya's LoCon, peft's ``lora.Conv2d``):
``catfast.reference.lora.lora_conv2d_ref`` semantics, with the row-aware backward of the fused CAT pass.

- The frozen base convolution runs over every sample in one launch; its backward computes dX for the
  samples that need gradients only (``catfast.ops.grad_rows.frozen_conv2d``).
- The LoRA branch runs per adapter slot on that slot's samples only (samples without an adapter, the
  CAT teacher's, cost nothing): a k x k down convolution to rank r, then the 1x1 up projection, scaled
  per sample, added to the base output. Samples that need gradients go through autograd; the others of
  the same slot (a frozen adapter in a mixed plan) run under no_grad. What backward keeps of the input
  is the one copy every op reading it shares.
Torch ops only, on every device: the LoRA branch is rank r, a small share of the layer's FLOPs
(registered in ``catfast.backends`` as op ``lora_conv2d`` with the torch backend only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catfast.backends import choose, register, torch_probe
from catfast.ops.grad_rows import autocast_inputs, frozen_conv2d, scatter_rows, take_samples
from catfast.rows import RowPlan, run_of

register("lora_conv2d", "row-planned LoRA Conv2d (kohya LoCon), row-aware backward", torch=torch_probe)


def lora_conv2d(
    x: torch.Tensor,
    base: torch.nn.Conv2d,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: RowPlan,
) -> torch.Tensor:
    """``base(x)`` plus each sample's LoRA term. Shapes: x ``[N, in, H, W]``; lora_a
    ``[S, r, in, kh, kw]`` (base's kernel); lora_b ``[S, out, r]``; plan of length N (scales already
    include each adapter's alpha / r). The down convolution uses ``base``'s stride and padding, as peft's does."""
    _check(x, base, lora_a, lora_b, plan)
    choose("lora_conv2d", x.device, x.dtype)  # torch only: checks CATFAST_BACKEND's value, forces nothing
    y = frozen_conv2d(x, base, plan)
    for slot, needs_grad, host_samples in plan.layout.by_slot:
        samples, run = plan.index(host_samples), run_of(host_samples)
        with torch.set_grad_enabled(needs_grad and torch.is_grad_enabled()):
            low = _DownRows.apply(*autocast_inputs(x, lora_a[slot]), samples, run, base.stride, base.padding)
            delta = F.conv2d(low, lora_b[slot][:, :, None, None]) * plan.scales[samples].view(-1, 1, 1, 1)
        y = _add_rows(y, samples, run, delta.to(y.dtype))
    return y


class _DownRows(torch.autograd.Function):
    """low = conv2d(x[samples], A): the k x k down projection of some samples. Saves the whole ``x``, not
    a copy of its rows: the norm before it saves the same tensor, and a copy of the rows would add a launch
    and bytes."""

    @staticmethod
    def forward(ctx, x, lora_a, samples, run, stride, padding):
        ctx.samples, ctx.run, ctx.stride, ctx.padding = samples, run, stride, padding
        ctx.save_for_backward(x, lora_a)
        return F.conv2d(take_samples(x, samples, ctx.run), lora_a, None, stride, padding)

    @staticmethod
    def backward(ctx, d_low):
        x, lora_a = ctx.saved_tensors
        rows = take_samples(x, ctx.samples, ctx.run)
        da = dx = None
        if ctx.needs_input_grad[1]:
            da = torch.nn.grad.conv2d_weight(rows, lora_a.shape, d_low, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[0]:
            dx_rows = torch.nn.grad.conv2d_input(rows.shape, lora_a, d_low, ctx.stride, ctx.padding)
            dx = scatter_rows(dx_rows, x.shape, ctx.samples, ctx.run, x.shape[0])
        return dx, da, None, None, None, None


def _add_rows(y: torch.Tensor, samples: torch.Tensor, run: tuple[int, int] | None, delta: torch.Tensor):
    """``y`` with ``delta`` added to the rows of ``samples`` (out of place, so autograd sees it)."""
    if run is None:
        return y.index_add(0, samples, delta)
    lo, hi = run
    return torch.cat([y[:lo], y[lo:hi] + delta, y[hi:]]) if hi - lo < y.shape[0] else y + delta


def _check(x, base, lora_a, lora_b, plan: RowPlan) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if len(plan) != x.shape[0]:
        raise ValueError(f"row plan has {len(plan)} rows but the batch has {x.shape[0]} samples")
    out_c, in_c, kh, kw = base.weight.shape
    if base.groups != 1 or base.padding_mode != "zeros" or not isinstance(base.padding, tuple):
        raise ValueError(f"{base}: only groups=1 convolutions with numeric zero padding are row-planned")
    if lora_a.shape[1:] != (lora_a.shape[1], in_c, kh, kw) or lora_b.shape[1] != out_c or lora_b.dim() != 3:
        raise ValueError(
            f"lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not fit the convolution "
            f"{tuple(base.weight.shape)} (expected [S, r, {in_c}, {kh}, {kw}] and [S, {out_c}, r])"
        )
    if lora_a.shape[0] != lora_b.shape[0] or lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} disagree on slots or rank")
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        raise ValueError("the base weight and bias must be frozen (requires_grad=False); only LoRA A/B train")
    for name, t in (("weight", base.weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
