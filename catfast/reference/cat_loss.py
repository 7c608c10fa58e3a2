"""Pure-torch reference of the fused CAT loss (the spec of csrc/cat_loss.cpp and csrc/cuda/cat_loss.cu).

The loss is the one ``catfast.train.objective.cat_loss`` computes from the UNet's predictions:
  ldm_i = mean over the sample's elements of (pred - target)^2
  cat_i = mean over the sample's elements of (pred_stripped - sg(teacher))^2
  ldm = mean_i w_i ldm_i,  cat = mean_i w_i cat_i  (w_i = 1 without weights: plain mse_loss)
  total = ldm + cat_weight * cat
in fp32 whatever the predictions' dtype. The teacher is a stop-gradient target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cat_loss_ref(
    pred: torch.Tensor,
    target: torch.Tensor,
    pred_stripped: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    cat_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ldm, cat) fp32 scalars with autograd to ``pred`` and ``pred_stripped``.

    Shapes: pred, target, pred_stripped, teacher ``[B, ...]`` (all the same shape); weights ``[B]`` (the
    min-SNR weights) or None. Without ``pred_stripped`` / ``teacher`` the CAT term is 0 (plain LoRA).
    """
    ldm = _weighted_mse(pred, target, weights)
    if pred_stripped is None:
        cat = torch.zeros((), device=pred.device)
    else:
        cat = _weighted_mse(pred_stripped, teacher.detach(), weights)
    return ldm + cat_weight * cat, ldm, cat


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights.float()).mean()
