"""catfast's kernels as ``torch.library`` custom ops under the ``catfast::`` namespace, so that
``torch.compile`` sees one opaque op per kernel (with a fake implementation for shapes) instead of a
Triton launch or a Python row plan it cannot trace.

Ops (the row plan is flattened to tensors and ints at the boundary: slots / scales as device tensors,
the host layout as ``int[]`` / ``bool[]``, so no op reads the device to plan its work):

- ``catfast::lora_gemm(x, weight, bias, lora_a, lora_b, slots, scales, rows, store_low) -> (y, t)``: the
  Triton row-planned GEMM ``y = x W^T + b + s (x A^T) B^T`` per sample, and ``t = x A^T`` (fp32; empty
  ``[0, r]`` unless ``store_low``). Shapes: x ``[M, in]`` (M = N x rows), weight ``[out, in]``, lora_a
  ``[S, r, in]``, lora_b ``[S, out, r]``, slots / scales ``[N]``. The input-gradient piece of the
  backward is the same op on transposed weights (``catfast.ops.lora.backward_rows``).
- ``catfast::segment_outer(lhs, rhs, row_scale, seg_offsets) -> out``: the Triton segmented reduction
  of the adapter gradients, ``out[s] = (row_scale * lhs)[seg s]^T rhs[seg s]`` ``[S, P, Q]`` fp32.
- ``catfast::lora_linear``, the whole differentiable row-planned LoRA Linear, is registered by
  ``catfast.ops.lora`` beside the autograd Function it mirrors: it is built from that module's
  ``forward_rows`` / ``backward_rows``, which call the ops here.
- ``catfast::segmented_lora_linear_(y!, x, lora_a, lora_b, coef, slots, tile_seg, tile_row, seg_stop,
  block_m) -> ()``: the Triton segmented mixed-adapter LoRA of serving, added into ``y`` in place.
- ``catfast::merge_lora_(weights!, downs, ups, scales) -> ()``: the multi-layer merge (extension or
  torch, as ``catfast.ops.merge.merge_lora_`` chooses), in place.

The pure-torch backends need no op: dynamo traces torch code as it is. The ``call_*`` functions are
what catfast's ops call: the custom op while torch.compile traces, the launcher itself in eager mode
(the dispatcher's cost per call is measured in ``tracing``). Importing this module registers the ops
(``catfast.ops.lora`` / ``catfast.ops.segmented`` import it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from catfast.rows import RowLayout, RowPlan


def host_plan(slots: Tensor, scales: Tensor, slots_host, needs_grad_host) -> RowPlan:
    """A ``RowPlan`` from its flattened form, its layout known on the host (no device read)."""
    needs_grad = torch.tensor(list(needs_grad_host), dtype=torch.bool, device=slots.device)
    plan = RowPlan(slots, scales, needs_grad)
    plan._seed(RowLayout(tuple(int(s) for s in slots_host), tuple(bool(g) for g in needs_grad_host)))
    return plan


def flatten_plan(plan: RowPlan) -> tuple[Tensor, Tensor, list[int], list[bool]]:
    """``(slots, scales, slots_host, needs_grad_host)``: the plan at an op boundary."""
    return plan.slots, plan.scales, list(plan.layout.slots), list(plan.layout.needs_grad)


def tracing(*tensors: Tensor) -> bool:
    """True while torch.compile / export traces (dynamo, or AOT autograd on fake tensors): then the Triton
    launches go through the custom ops. Eager calls run the launchers directly: the custom-op dispatch
    cost ~110-190 us a call on the loaded dev CPU (catfast::merge_lora_ vs the function it wraps), per
    LoRA layer and pass."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(t) for t in tensors)


# -- the Triton GEMM and the adapter-gradient reduction --------------------------------------------------


def lora_gemm_impl(x, weight, bias, lora_a, lora_b, slots, scales, rows: int, store_low: bool):
    """``catfast::lora_gemm`` without the dispatcher (see ``tracing``)."""
    from catfast.kernels.lora_gemm import lora_gemm as launch

    y, low = launch(x, weight.t(), bias, lora_a.transpose(1, 2), lora_b.transpose(1, 2), slots, scales, rows,
                    store_low=store_low)  # fmt: skip
    return y, low if low is not None else x.new_empty((0, lora_a.shape[1]), dtype=torch.float32)


def call_lora_gemm(x, weight, bias, lora_a, lora_b, slots, scales, rows: int, store_low: bool):
    """The row-planned Triton GEMM: the custom op while tracing, the launcher otherwise."""
    fn = torch.ops.catfast.lora_gemm if tracing(x) else lora_gemm_impl
    return fn(x, weight, bias, lora_a, lora_b, slots, scales, rows, store_low)


def call_segment_outer(lhs, rhs, row_scale, seg_offsets):
    """The adapter-gradient reduction: the custom op while tracing, the launcher otherwise."""
    if tracing(lhs):
        return torch.ops.catfast.segment_outer(lhs, rhs, row_scale, seg_offsets)
    from catfast.kernels.lora_gemm import segment_outer as launch

    return launch(lhs, rhs, row_scale, seg_offsets)


@torch.library.custom_op("catfast::lora_gemm", mutates_args=())
def lora_gemm(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, slots: Tensor, scales: Tensor,
    rows: int, store_low: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return lora_gemm_impl(x, weight, bias, lora_a, lora_b, slots, scales, rows, store_low)


@lora_gemm.register_fake
def _(x, weight, bias, lora_a, lora_b, slots, scales, rows, store_low):
    r = lora_a.shape[1]
    low = x.new_empty((x.shape[0] if store_low else 0, r), dtype=torch.float32)
    return x.new_empty((x.shape[0], weight.shape[0])), low


@torch.library.custom_op("catfast::segment_outer", mutates_args=())
def segment_outer(lhs: Tensor, rhs: Tensor, row_scale: Tensor, seg_offsets: Tensor) -> Tensor:
    from catfast.kernels.lora_gemm import segment_outer as launch

    return launch(lhs, rhs, row_scale, seg_offsets)


@segment_outer.register_fake
def _(lhs, rhs, row_scale, seg_offsets):
    return lhs.new_empty((seg_offsets.shape[0] - 1, lhs.shape[1], rhs.shape[1]), dtype=torch.float32)


# -- serving and merging ------------------------------------------------------------------------------------


def call_segmented_lora_linear_(y, x, lora_a, lora_b, coef, slots, tile_seg, tile_row, seg_stop, block_m: int):
    """The segmented Triton LoRA into ``y``: the custom op while tracing, the launcher otherwise."""
    if tracing(x):
        torch.ops.catfast.segmented_lora_linear_(y, x, lora_a, lora_b, coef, slots, tile_seg, tile_row, seg_stop,
                                                 block_m)  # fmt: skip
        return
    from catfast.kernels.segmented_lora import segmented_launch_

    segmented_launch_(y, x, lora_a, lora_b, coef, slots, tile_seg, tile_row, seg_stop, block_m)


@torch.library.custom_op("catfast::segmented_lora_linear_", mutates_args=("y",))
def segmented_lora_linear_(
    y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, coef: Tensor, slots: Tensor, tile_seg: Tensor,
    tile_row: Tensor, seg_stop: Tensor, block_m: int,
) -> None:  # fmt: skip
    from catfast.kernels.segmented_lora import segmented_launch_

    segmented_launch_(y, x, lora_a, lora_b, coef, slots, tile_seg, tile_row, seg_stop, block_m)


@segmented_lora_linear_.register_fake
def _(y, x, lora_a, lora_b, coef, slots, tile_seg, tile_row, seg_stop, block_m):
    return None


@torch.library.custom_op("catfast::merge_lora_", mutates_args=("weights",))
def merge_lora_(weights: list[Tensor], downs: list[Tensor], ups: list[Tensor], scales: list[float]) -> None:
    from catfast.ops.merge import merge_lora_ as merge

    merge(weights, downs, ups, scales)


@merge_lora_.register_fake
def _(weights, downs, ups, scales):
    return None
