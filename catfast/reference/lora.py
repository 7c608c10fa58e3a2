"""Pure-torch reference of the row-planned LoRA linear (the spec, the CPU path and the test oracle
of catfast/kernels/lora_gemm.py)."""

from __future__ import annotations

import torch

from catfast.rows import NO_ADAPTER, RowPlan


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: RowPlan,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """Row-planned LoRA linear.

    Semantics, for every sample n and each of its rows x[n, l]:
      y[n, l] = x[n, l] @ weight^T + bias + scales[n] * (x[n, l] @ A[slots[n]]^T) @ B[slots[n]]^T
    with no LoRA term where ``slots[n] == NO_ADAPTER``.

    Shapes: x ``[N, ..., in]`` (N = len(plan)); weight ``[out, in]``; bias ``[out]`` or None;
    lora_a ``[S, r, in]``; lora_b ``[S, out, r]`` (S adapter slots); y ``[N, ..., out]`` in x's dtype.
    ``upcast`` computes in fp32 (the oracle for fp16/bf16 kernels). Differentiable in x, A and B.
    """
    out_dtype = x.dtype
    if upcast:
        x, weight, lora_a, lora_b = x.float(), weight.float(), lora_a.float(), lora_b.float()
        bias = bias.float() if bias is not None else None
    y = torch.nn.functional.linear(x, weight, bias)
    n = x.shape[0]
    flat = x.reshape(n, -1, x.shape[-1])
    # Per-sample A/B gathered by slot; samples without an adapter get zero scale (and slot 0 as a
    # harmless index) so the whole batch is one batched matmul.
    has = plan.slots != NO_ADAPTER
    idx = torch.where(has, plan.slots, torch.zeros_like(plan.slots))
    scale = torch.where(has, plan.scales, torch.zeros_like(plan.scales)).to(flat.dtype)
    low = torch.bmm(flat, lora_a[idx].transpose(1, 2))  # [N, L, r]
    delta = torch.bmm(low * scale.view(n, 1, 1), lora_b[idx].transpose(1, 2))  # [N, L, out]
    return (y + delta.view(y.shape)).to(out_dtype)


def lora_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: RowPlan,
    *,
    stride=1,
    padding=0,
) -> torch.Tensor:
    """Row-planned LoRA Conv2d with a k x k down projection (kohya's LoCon; peft's ``lora.Conv2d``).

    Semantics, for every sample n:
      y[n] = conv(x[n], weight, bias) + scales[n] * conv1x1(conv(x[n], A[slots[n]]), B[slots[n]])
    where both k x k convolutions use ``stride`` and ``padding``, with no LoRA term where
    ``slots[n] == NO_ADAPTER``.

    Shapes: x ``[N, in, H, W]``; weight ``[out, in, kh, kw]``; bias ``[out]`` or None; lora_a
    ``[S, r, in, kh, kw]``; lora_b ``[S, out, r]``; y ``[N, out, H', W']``. One sample at a time: the
    spec, not a fast path. Differentiable in x, A and B.
    """
    F = torch.nn.functional
    rows = []
    for n in range(x.shape[0]):
        y = F.conv2d(x[n : n + 1], weight, bias, stride, padding)
        slot = int(plan.slots[n])
        if slot != NO_ADAPTER:
            low = F.conv2d(x[n : n + 1], lora_a[slot], None, stride, padding)
            y = y + plan.scales[n].to(y.dtype) * F.conv2d(low, lora_b[slot][:, :, None, None])
        rows.append(y)
    return torch.cat(rows)
