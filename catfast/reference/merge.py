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


@torch.no_grad()
def swap_lora_ref_(
    weights: list[torch.Tensor],
    downs_out: list[torch.Tensor],
    ups_out: list[torch.Tensor],
    scales_out: list[float],
    downs_in: list[torch.Tensor],
    ups_in: list[torch.Tensor],
    scales_in: list[float],
) -> None:
    """In place, take one merged adapter out and put another in, rounding W once:
    ``W_i <- cast(float(W_i) + s_in_i * B_in_i @ A_in_i - s_out_i * B_out_i @ A_out_i)``.

    Shapes as in ``merge_lora_ref_``; the two adapters may have different ranks."""
    n = len(weights)
    if not (len(downs_out) == len(ups_out) == len(scales_out) == len(downs_in) == len(ups_in) == len(scales_in) == n):
        raise ValueError(
            f"swap_lora_: weights and both adapters' downs, ups and scales must have the same length ({n})"
        )
    for i, w in enumerate(weights):
        _check_layer(i, w, downs_out[i], ups_out[i])
        _check_layer(i, w, downs_in[i], ups_in[i])
    for i, w in enumerate(weights):
        out = w.shape[0]
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = torch.zeros(out, w.numel() // out, dtype=acc, device=w.device)
        for a, b, s in ((downs_in[i], ups_in[i], scales_in[i]), (downs_out[i], ups_out[i], -scales_out[i])):
            delta += s * (b.reshape(out, a.shape[0]).to(acc) @ a.reshape(a.shape[0], -1).to(acc))
        w.copy_((w.to(acc) + delta.view(w.shape)).to(w.dtype))
