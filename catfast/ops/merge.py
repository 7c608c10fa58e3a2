"""Merge, unmerge and swap LoRA deltas in base weights, choosing the fastest backend that can run.

Backends, in priority order: the extension ``catfast._C`` (CPU tensors: one call for all layers, one
fp32 GEMM per layer; CUDA tensors in a CUDA build: one kernel launch for all layers, csrc/cuda/merge_lora.cu)
and the pure-torch reference (any device). Both accumulate in fp32 and round W once. ``CATFAST_BACKEND=torch``
forces the reference; ``CATFAST_BACKEND=ext`` forces the extension and raises when it cannot run;
``CATFAST_BACKEND=triton`` raises (no Triton merge). Registered in ``catfast.backends`` as ops ``merge_lora``
and ``swap_lora``.
"""

from __future__ import annotations

import torch

from catfast._ext import EXT
from catfast.backends import choose, ext_probe, register, torch_probe
from catfast.reference.merge import merge_lora_ref_, swap_lora_ref_

register("merge_lora", "multi-layer LoRA merge / unmerge into base weights (in place)",
         ext=ext_probe, torch=torch_probe)  # fmt: skip
register("swap_lora", "multi-layer LoRA swap: one merged adapter out, another in, one pass over W (in place)",
         ext=ext_probe, torch=torch_probe)  # fmt: skip

_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ext_not_supported_reasons(
    weights: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor]
) -> list[str]:
    """Why the extension cannot merge these tensors, beyond ``ext_probe`` (empty list: it can)."""
    reasons = []
    tensors = [*weights, *downs, *ups]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors are on several devices ({', '.join(sorted(map(str, devices)))})")
    elif tensors and tensors[0].device.type not in ("cpu", "cuda"):
        reasons.append(f"tensors are on {tensors[0].device.type}")
    if any(w.dtype not in _EXT_DTYPES or not w.is_contiguous() for w in weights):
        reasons.append("weights must be contiguous float32/float16/bfloat16")
    return reasons


def merge_lora_(
    weights: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor], scales: list[float]
) -> None:
    """In place, for every layer i: ``W_i += s_i * B_i @ A_i`` (see ``merge_lora_ref_`` for shapes).

    All layers are validated before any weight is written. Accumulates in fp32 and rounds W once.
    """
    if _choose("merge_lora", weights, downs, ups) == "ext":
        args = (list(weights), list(downs), list(ups), [float(s) for s in scales])
        if weights[0].is_cuda:
            _ext_call(EXT.merge_lora_cuda_, *args, [], [], [])
        else:
            _ext_call(EXT.merge_lora_, *args)
        return
    merge_lora_ref_(weights, downs, ups, scales)


def swap_lora_(
    weights: list[torch.Tensor],
    downs_out: list[torch.Tensor],
    ups_out: list[torch.Tensor],
    scales_out: list[float],
    downs_in: list[torch.Tensor],
    ups_in: list[torch.Tensor],
    scales_in: list[float],
) -> None:
    """In place, for every layer i: ``W_i += s_in_i * B_in_i @ A_in_i - s_out_i * B_out_i @ A_out_i``: the
    merged adapter "out" leaves and "in" takes its place in one pass over W, rounded once (an unmerge then
    a merge reads and writes every weight twice and rounds a bf16/fp16 weight twice). Shapes as in
    ``merge_lora_ref_``; the ranks of the two adapters may differ. Validates every layer before writing."""
    if _choose("swap_lora", weights, [*downs_out, *downs_in], [*ups_out, *ups_in]) == "torch":
        swap_lora_ref_(weights, downs_out, ups_out, scales_out, downs_in, ups_in, scales_in)
        return
    w = list(weights)
    out_args = (list(downs_out), list(ups_out), [float(s) for s in scales_out])
    in_args = (list(downs_in), list(ups_in), [float(s) for s in scales_in])
    if len({len(w), *map(len, out_args), *map(len, in_args)}) != 1:
        raise ValueError(
            f"swap_lora_: weights and both adapters' downs, ups and scales must have the same length ({len(w)})"
        )
    if w and w[0].is_cuda:
        _ext_call(EXT.merge_lora_cuda_, w, *in_args, out_args[0], out_args[1], [-s for s in out_args[2]])
    else:
        _ext_call(EXT.swap_lora_, w, *out_args, *in_args)


def _choose(op: str, weights, downs, ups) -> str:
    """The backend of ``op`` for these tensors (``catfast.backends.choose`` with the extension's per-call
    reasons); torch for an empty list of layers."""
    if not weights:
        return "torch"
    why_not = {"ext": ext_not_supported_reasons(weights, downs, ups)}
    return choose(op, weights[0].device, weights[0].dtype, why_not=why_not)


def _ext_call(fn, *args) -> None:
    try:
        fn(*args)
    except RuntimeError as e:  # TORCH_CHECK failures; raised before any weight is written
        raise ValueError(str(e).split("\nException raised from")[0]) from None


def unmerge_lora_(
    weights: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor], scales: list[float]
) -> None:
    """Undo :func:`merge_lora_`: ``W_i -= s_i * B_i @ A_i`` (exact up to one rounding per element)."""
    merge_lora_(weights, downs, ups, [-float(s) for s in scales])
