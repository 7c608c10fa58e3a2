"""The fused CAT loss as an autograd Function, with its backend choice.

``fused_cat_loss`` computes what ``catfast.reference.cat_loss.cat_loss_ref`` computes (L_LDM, L_CAT with
per-sample weights, the teacher a stop-gradient target) and forms both gradients in the same pass that
reads the predictions, so backward only scales them. Backends: the extension (``catfast._C``:
``cat_loss_cpu`` on the CPU, ``cat_loss_cuda`` in a CUDA build) and torch (the reference under autograd).
``CATFAST_BACKEND=torch`` forces the reference; ``CATFAST_BACKEND=ext`` forces the extension and raises
when it cannot run; otherwise the extension runs when it can (op ``cat_loss`` in ``catfast.backends``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from catfast._ext import EXT
from catfast.backends import choose, ext_probe, register, torch_probe
from catfast.reference.cat_loss import cat_loss_ref

register("cat_loss", "fused CAT loss (L_LDM + w L_CAT, both gradients in one pass)", ext=ext_probe, torch=torch_probe)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CatLossTerms(NamedTuple):
    """fp32 scalars: ``total = ldm + cat_weight * cat`` and its two terms, each differentiable."""

    total: torch.Tensor
    ldm: torch.Tensor
    cat: torch.Tensor


def ext_not_supported_reasons(tensors: list[torch.Tensor]) -> list[str]:
    """Why the extension cannot compute this loss, beyond ``ext_probe`` (empty list: it can)."""
    reasons = []
    kind = tensors[0].device.type
    if kind not in ("cpu", "cuda"):
        reasons.append(f"tensors on {kind}")
    if any(t.dtype not in _DTYPES for t in tensors):
        reasons.append("predictions and targets must be float32/float16/bfloat16")
    return reasons


def fused_cat_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    pred_stripped: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    cat_weight: float = 1.0,
) -> CatLossTerms:
    """(total, ldm, cat) of the CAT objective from the UNet's predictions (see ``cat_loss_ref``).

    Shapes: pred (adapter, trigger caption), target (eps or v), pred_stripped (adapter, stripped caption),
    teacher (base, stripped caption; no gradient) all ``[B, ...]``; weights ``[B]`` (min-SNR) or None.
    Gradients flow to ``pred`` and ``pred_stripped``. Bad input raises ValueError naming the argument.
    """
    _check(pred, target, pred_stripped, teacher, weights, cat_weight)
    tensors = [t for t in (pred, target, pred_stripped, teacher) if t is not None]
    why_not = {"ext": ext_not_supported_reasons(tensors)}
    if choose("cat_loss", pred.device, pred.dtype, why_not=why_not) == "torch":
        return CatLossTerms(*cat_loss_ref(pred, target, pred_stripped, teacher, weights, cat_weight))
    w = weights.detach().float().contiguous() if weights is not None else None
    out = _FusedCatLoss.apply(pred, target, pred_stripped, teacher, w, float(cat_weight))
    return CatLossTerms(out[0], out[1], out[2])


class _FusedCatLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, pred_stripped, teacher, weights, cat_weight):
        fn = EXT.cat_loss_cuda if pred.is_cuda else EXT.cat_loss_cpu
        args = [t.detach().contiguous() if t is not None else None for t in (pred, target, pred_stripped, teacher)]
        try:
            out, g_ldm, g_cat = fn(*args, weights, cat_weight)
        except RuntimeError as e:  # TORCH_CHECK failures name the argument
            raise ValueError(str(e).split("\nException raised from")[0]) from None
        ctx.save_for_backward(g_ldm, g_cat)
        ctx.cat_weight = cat_weight
        ctx.dtypes = (pred.dtype, pred_stripped.dtype if pred_stripped is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g_ldm, g_cat = ctx.saved_tensors
        d_pred = d_stripped = None
        if ctx.needs_input_grad[0]:
            d_pred = (g_ldm * (grad_out[0] + grad_out[1])).to(ctx.dtypes[0])
        if g_cat is not None and ctx.needs_input_grad[2]:
            d_stripped = (g_cat * (ctx.cat_weight * grad_out[0] + grad_out[2])).to(ctx.dtypes[1])
        return d_pred, None, d_stripped, None, None, None


def _check(pred, target, pred_stripped, teacher, weights, cat_weight) -> None:
    if (pred_stripped is None) != (teacher is None):
        raise ValueError("pred_stripped and teacher come together (both or neither)")
    if pred.dim() < 1 or pred.numel() == 0:
        raise ValueError(f"pred must be a non-empty [B, ...] tensor, got shape {tuple(pred.shape)}")
    for name, t in (("target", target), ("pred_stripped", pred_stripped), ("teacher", teacher)):
        if t is None:
            continue
        if t.shape != pred.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != pred shape {tuple(pred.shape)}")
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device}, pred on {pred.device}")
    if weights is not None:
        if weights.shape != (pred.shape[0],):
            raise ValueError(f"weights must be [B]=[{pred.shape[0]}], got shape {tuple(weights.shape)}")
        if weights.device != pred.device:
            raise ValueError(f"weights is on {weights.device}, pred on {pred.device}")
    if not cat_weight >= 0:
        raise ValueError(f"cat_weight must be >= 0, got {cat_weight}")
