"""Pure-torch reference of fused GroupNorm + SiLU (the spec of csrc/groupnorm_silu.cpp and
csrc/cuda/groupnorm_silu.cu): the ``norm -> silu`` pair that opens every ResNet block of an SD UNet.

  y = silu(group_norm(x, num_groups, weight, bias, eps))
computed in fp32 (fp64 for fp64 input: the tests' ground truth; biased variance, as ``torch.nn.GroupNorm``)
and rounded once to x's dtype.
The row-aware backward takes ``grad_samples``, a bool ``[N]`` of the samples whose gradient is needed;
the others' grad_output is taken as zero (the teacher rows of a fused CAT step), so their dx is zero and
they add nothing to dweight / dbias. GroupNorm never mixes samples, so when their grad_output really is
zero this is exactly the full backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``silu(group_norm(x))`` in fp32, rounded to x's dtype. x ``[N, C, *]``, weight / bias ``[C]`` or None."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    return F.silu(F.group_norm(x.to(acc), num_groups, w, b, eps)).to(x.dtype)


def group_norm_silu_backward_ref(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    grad_samples: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx in x's dtype, dweight and dbias in the compute dtype or None) by autograd in fp32 (fp64 for fp64 x).

    ``grad_samples``: bool ``[N]``, or None for every sample."""
    acc = torch.promote_types(x.dtype, torch.float32)
    dy = grad_output.to(acc)
    if grad_samples is not None:
        dy = dy * grad_samples.to(device=dy.device, dtype=dy.dtype).view(-1, *([1] * (dy.dim() - 1)))
    xf = x.detach().to(acc).requires_grad_(True)
    w = weight.detach().to(acc).requires_grad_(True) if weight is not None else None
    b = bias.detach().to(acc).requires_grad_(True) if bias is not None else None
    with torch.enable_grad():
        y = F.silu(F.group_norm(xf, num_groups, w, b, eps))
        grads = torch.autograd.grad(y, [t for t in (xf, w, b) if t is not None], dy)
    dx = grads[0].to(x.dtype)
    dw = grads[1] if w is not None else None
    db = grads[-1] if b is not None else None
    return dx, dw, db
