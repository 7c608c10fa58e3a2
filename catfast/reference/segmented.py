"""Pure-torch reference of the segmented mixed-adapter LoRA (the spec and test oracle of
catfast/ops/segmented.py and catfast/kernels/segmented_lora.py): one row, one adapter at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmented_lora_linear_ref(x, weight, bias, lora_a, lora_b, scales, segments) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus, for every segment (start, stop, mix) and row n in it,
    ``sum over (slot, w) in mix of w * scales[slot] * (x[n] @ A[slot]^T) @ B[slot]^T``, in fp64.

    x ``[N, ..., in]``, weight ``[out, in]``, A ``[S, R, in]``, B ``[S, out, R]``, scales ``[S]``;
    segments: (start, stop, ((slot, weight), ...)) tuples. Returns fp64."""
    x, weight = x.double(), weight.double()
    y = F.linear(x, weight, None if bias is None else bias.double())
    for start, stop, mix in segments:
        for n in range(start, stop):
            for slot, w in mix:
                a, b = lora_a[slot].double(), lora_b[slot].double()
                y[n] += w * float(scales[slot]) * (x[n] @ a.T) @ b.T
    return y


def segmented_lora_conv2d_ref(x, conv: torch.nn.Conv2d, lora_a, lora_b, scales, segments) -> torch.Tensor:
    """The Conv2d twin: A ``[S, R, C*kh*kw]`` a conv with ``conv``'s geometry, B ``[S, out, R]`` a 1x1
    conv; fp64."""
    x = x.double()
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    bias = None if conv.bias is None else conv.bias.double()
    y = F.conv2d(x, conv.weight.double(), bias, **kw)
    kernel = (x.shape[1], *conv.kernel_size)
    for start, stop, mix in segments:
        for n in range(start, stop):
            for slot, w in mix:
                a = lora_a[slot].double().view(-1, *kernel)
                b = lora_b[slot].double()[:, :, None, None]
                t = F.conv2d(x[n : n + 1], a, None, **kw)
                y[n] += w * float(scales[slot]) * F.conv2d(t, b)[0]
    return y
