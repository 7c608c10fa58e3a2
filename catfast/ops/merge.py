"""Merge and unmerge LoRA deltas into base weights, choosing the fastest backend that can run.

Backends, in priority order: the C++ extension (CPU tensors, one call for all layers, fp32
accumulate) and the pure-torch reference (any device), registered in ``catfast.backends`` as op
``merge_lora``. ``CATFAST_BACKEND=torch`` forces the reference; ``CATFAST_BACKEND=ext`` forces the
extension and raises when it cannot run; ``CATFAST_BACKEND=triton`` raises (no Triton merge).
"""

from __future__ import annotations

import torch

from catfast._ext import EXT
from catfast.backends import choose, ext_probe, register, torch_probe
from catfast.reference.merge import merge_lora_ref_

register("merge_lora", "multi-layer LoRA merge / unmerge into base weights (in place)",
         ext=ext_probe, torch=torch_probe)  # fmt: skip

_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ext_not_supported_reasons(
    weights: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor]
) -> list[str]:
    """Why the extension cannot merge these tensors, beyond ``ext_probe`` (empty list: it can)."""
    reasons = []
    tensors = [*weights, *downs, *ups]
    if any(t.device.type != "cpu" for t in tensors):
        reasons.append("tensors are not all on the CPU")
    if any(w.dtype not in _EXT_DTYPES or not w.is_contiguous() for w in weights):
        reasons.append("weights must be contiguous float32/float16/bfloat16")
    return reasons


def merge_lora_(
    weights: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor], scales: list[float]
) -> None:
    """In place, for every layer i: ``W_i += s_i * B_i @ A_i`` (see ``merge_lora_ref_`` for shapes).

    All layers are validated before any weight is written. Accumulates in fp32 and rounds W once.
    """
    device = weights[0].device if weights else torch.device("cpu")
    dtype = weights[0].dtype if weights else None
    why_not = {"ext": ext_not_supported_reasons(weights, downs, ups)}
    if choose("merge_lora", device, dtype, why_not=why_not) == "ext":
        try:
            EXT.merge_lora_(list(weights), list(downs), list(ups), [float(s) for s in scales])
        except RuntimeError as e:  # TORCH_CHECK failures; raised before any weight is written
            raise ValueError(str(e).split("\nException raised from")[0]) from None
        return
    merge_lora_ref_(weights, downs, ups, scales)


def unmerge_lora_(
    weights: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor], scales: list[float]
) -> None:
    """Undo :func:`merge_lora_`: ``W_i -= s_i * B_i @ A_i`` (exact up to one rounding per element)."""
    merge_lora_(weights, downs, ups, [-float(s) for s in scales])
