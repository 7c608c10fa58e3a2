"""Fused GroupNorm + SiLU as an autograd Function with a row-aware backward, and its backend choice.

``group_norm_silu(x, G, weight, bias, eps, grad_samples=...)`` is ``silu(group_norm(x))`` (the opening
pair of every SD ResNet block; spec: ``catfast.reference.groupnorm_silu``). Backward computes dx only
for the samples in ``grad_samples`` (the others' grad_output is known zero: the teacher rows of a
fused CAT step), and saves only x and the per-group statistics: the GroupNorm output torch keeps for
SiLU's backward is never stored.

Backends: the extension (``catfast._C``: CPU and, in a CUDA build, CUDA) and torch (``F.silu(F.group_norm
(x))`` in x's dtype, what a user writes). ``CATFAST_BACKEND=torch|ext`` forces one (ext raises when it
cannot run); otherwise the extension runs when it can, except on the CPU below ``CPU_MIN_POSITIONS``
positions per channel, where torch measured faster (op ``group_norm_silu`` in ``catfast.backends``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from catfast._ext import EXT
from catfast.backends import choose, ext_probe, forced, register, torch_probe

register("group_norm_silu", "fused GroupNorm + SiLU, row-aware backward", ext=ext_probe, torch=torch_probe)

# Below this many positions per channel the C++ CPU version lost to torch: `catfast bench ops` on the shared
# 2-core dev CPU, 1 thread, process CPU time, forward + backward: 0.68x at 8x8 and 0.84x at 16x16 (1280
# channels), 1.05x at 32x32 and 1.19x at 64x64 (the row-aware backward: 0.85x / 1.08x / 1.27x / 2.86x).
CPU_MIN_POSITIONS = 32 * 32


def ext_not_supported_reasons(x: torch.Tensor) -> list[str]:
    """Why the extension cannot run this op on ``x``, beyond ``ext_probe`` (empty list: it can)."""
    if x.device.type not in ("cpu", "cuda"):
        return [f"x is on {x.device.type}"]
    if x.device.type == "cpu" and x.dtype != torch.float32:
        # the C++ CPU version is fp32 only: in bf16 it measured 5.6x slower than torch (csrc/groupnorm_silu.cpp)
        return [f"the CPU version is float32 only, x is {x.dtype}"]
    return []


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    grad_samples: Sequence[bool] | torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))``, x ``[N, C, *]``, weight / bias ``[C]`` or None.

    ``grad_samples``: bool ``[N]`` (host sequence or tensor), the samples whose gradient backward computes;
    the others get dx = 0 and add nothing to dweight / dbias (their grad_output must be zero, which is
    what makes this exact). None: every sample. Both backends honour it (torch by zeroing those rows of
    grad_output).
    """
    _check(x, num_groups, weight, bias, grad_samples)
    backend = choose("group_norm_silu", x.device, x.dtype, why_not={"ext": ext_not_supported_reasons(x)})
    if backend == "ext" and forced() is None and x.device.type == "cpu" and x[0, 0].numel() < CPU_MIN_POSITIONS:
        backend = "torch"  # the automatic choice: on the CPU torch is faster below CPU_MIN_POSITIONS
    if backend == "torch":
        y = F.silu(F.group_norm(x, num_groups, weight, bias, eps))
        if grad_samples is not None and y.requires_grad:
            keep = torch.as_tensor(grad_samples, dtype=torch.bool).to(y.device).view(-1, *([1] * (y.dim() - 1)))
            y.register_hook(lambda g: g * keep.to(g.dtype))
        return y
    mask = None
    if grad_samples is not None:
        mask = torch.as_tensor(grad_samples, dtype=torch.bool).to(device=x.device, dtype=torch.uint8)
    return _GroupNormSilu.apply(x, weight, bias, int(num_groups), float(eps), mask)


class _GroupNormSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, mask):
        suffix = "cuda" if x.is_cuda else "cpu"
        xc = x.detach().contiguous()
        w = weight.detach().contiguous() if weight is not None else None
        b = bias.detach().contiguous() if bias is not None else None
        y, mean, rstd = getattr(EXT, f"group_norm_silu_fwd_{suffix}")(xc, w, b, num_groups, eps)
        ctx.save_for_backward(xc, w, b, mean, rstd, mask)
        ctx.num_groups, ctx.suffix = num_groups, suffix
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, w, b, mean, rstd, mask = ctx.saved_tensors
        bwd = getattr(EXT, f"group_norm_silu_bwd_{ctx.suffix}")
        dx, dw, db = bwd(grad_out.contiguous().to(x.dtype), x, w, b, mean, rstd, mask, ctx.num_groups)
        dw = dw.to(w.dtype) if w is not None and ctx.needs_input_grad[1] else None
        db = db.to(b.dtype) if b is not None and ctx.needs_input_grad[2] else None
        return dx if ctx.needs_input_grad[0] else None, dw, db, None, None, None


def _check(x, num_groups, weight, bias, grad_samples) -> None:
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [N, C, *] tensor, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channels of x ({channels})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(f"{name} must be [C]=[{channels}], got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise ValueError(f"weight ({weight.dtype}) and bias ({bias.dtype}) must have the same dtype")
    if grad_samples is not None and len(grad_samples) != x.shape[0]:
        raise ValueError(f"grad_samples must have one entry per sample ({x.shape[0]}), got {len(grad_samples)}")
