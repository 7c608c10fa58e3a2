"""Pure-torch reference for merging LoRA deltas into base weights (the spec of csrc/merge_lora.cpp)."""

from __future__ import annotations

import torch


@torch.no_grad()
def merge_lora_ref_(
    weights: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor], scales: list[float]
) -> None:
    """In place, for every layer i: ``W_i <- cast(float(W_i) + s_i * float(B_i) @ float(A_i))``.

    Shapes: W ``[out, in]`` (Linear) or ``[out, in, kh, kw]`` (Conv2d); A (down) ``[r, in]`` or
    ``[r, in, kh, kw]``; B (up) ``[out, r]`` or ``[out, r, 1, 1]``. The delta is computed in fp32 and W
    is rounded once to its dtype (fp64 weights accumulate in fp64). Unmerge is the same call with ``-s``.
    """
    if not (len(weights) == len(downs) == len(ups) == len(scales)):
        raise ValueError(
            f"merge_lora_: weights, downs, ups and scales must have the same length, got "
            f"{len(weights)}, {len(downs)}, {len(ups)}, {len(scales)}"
        )
    for i, (w, a, b) in enumerate(zip(weights, downs, ups)):
        _check_layer(i, w, a, b)
    for w, a, b, s in zip(weights, downs, ups, scales):
        out, rank = w.shape[0], a.shape[0]
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = b.reshape(out, rank).to(acc) @ a.reshape(rank, -1).to(acc)
        w.copy_((w.to(acc) + s * delta.view(w.shape)).to(w.dtype))


def _check_layer(i: int, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    out, rank = w.shape[0], a.shape[0]
    if b.shape[0] != out or b.numel() != out * rank or a.numel() != rank * (w.numel() // out):
        raise ValueError(
            f"merge_lora_: layer {i}: weight {tuple(w.shape)} does not fit down {tuple(a.shape)} / up {tuple(b.shape)}"
        )
