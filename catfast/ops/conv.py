"""Frozen-weight Conv2d on the CPU by the faster of two exact algorithms, chosen per shape by timing them.

The algorithms:
- ``native``: torch's convolution (oneDNN on the CPU) and its input gradient;
- ``gemm``: im2col (``F.unfold``) and one GEMM against the weight viewed as ``[C_out, C_in * kh * kw]``;
  the input gradient is one GEMM and col2im (``F.fold``). Same sums, in another order: fp32 rounding apart.

Why: on the small feature maps of a UNet's inner levels oneDNN is slow. On the 2-core dev CPU at 1 thread a
1280 -> 1280 3x3 convolution over 3 x 4x4 positions ran its forward at 28 GFLOP/s and its input gradient at
26, against 83 and 83 as im2col + GEMM (3.0x, 3.2x), 2560 -> 1280 at 31 / 31 against 102 / 99; on 16x16 maps
oneDNN wins (0.4-0.9x) (benchmarks/README.md, "Convolutions on small maps"). Which wins depends on the batch
and the thread count too (an exploratory sweep had the 4x4 case at batch 1 faster on oneDNN), so no static
rule held: the first call of a shape times both algorithms, the forward and the input gradient apart (a
row-planned backward runs the input gradient on fewer rows than the forward), and later calls of that shape
reuse the winner (the first step of a run pays the timing: 8 calls per shape). ``gemm`` is taken only when it
is at least ``MARGIN`` faster, so noise does not flip a near tie.

``CATFAST_CONV``: ``auto`` (default, timed per shape; like ``cudnn.benchmark`` the choice is per process, so
two processes agree to fp32 rounding, not bit for bit), ``native`` (torch's convolution always: bitwise what
torch computes, in every process) or ``gemm`` (always, where it applies: tests). Off the CPU, in grouped
convolutions, on maps of more than ``MAX_GEMM_POSITIONS`` and while ``torch.compile`` traces, the native
convolution runs, untimed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

ENV_VAR = "CATFAST_CONV"
SETTINGS = ("auto", "native", "gemm")
MARGIN = 1.15  # gemm must take at most 1 / MARGIN of native's time to be chosen
_TIMED_ROUNDS = 3
# Maps with more positions than this run natively without timing: oneDNN won on every map from 16x16 up that
# benchmarks/conv_algorithms.py measured (16x16 and 32x32: GEMM 0.2-0.9x), and im2col allocates 9x the input
# for every timing run (SD1.5's 64x64 level at batch 3: 141 MB)
MAX_GEMM_POSITIONS = 32 * 32

# (which, shapes, conv args, dtype, threads) -> "native" | "gemm", for the process
_choices: dict[tuple, str] = {}


def setting() -> str:
    """``CATFAST_CONV``, checked: one of ``SETTINGS`` (parsed once per value: it is read on every convolution)."""
    raw = os.environ.get(ENV_VAR)
    hit = _parsed.get(raw)
    if hit is None:
        value = (raw or "auto").strip().lower() or "auto"
        if value not in SETTINGS:
            raise ValueError(f"{ENV_VAR}={raw!r} is not valid; use one of {', '.join(SETTINGS)}")
        hit = _parsed[raw] = value
    return hit


_parsed: dict[str | None, str] = {}


def choices() -> dict[tuple, str]:
    """A copy of the per-shape choices made so far in this process (for benchmarks and tests)."""
    return dict(_choices)


def clear_choices() -> None:
    """Forget the per-shape choices (the next call of each shape times both algorithms again)."""
    _choices.clear()


def _output_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv2d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation):
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (groups 1) as im2col + one GEMM.
    x ``[N, C, H, W]``, weight ``[C_out, C, kh, kw]`` -> ``[N, C_out, H_out, W_out]`` (contiguous)."""
    n = x.shape[0]
    c_out, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    h_out = _output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w_out = _output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, K, L]
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [K, N * L]: one column per output position
    w2 = weight.reshape(c_out, -1)
    # one GEMM over all N * L positions reads the weight once (a batched matmul read it N times: 1.5x slower),
    # with the weight on the left: [C_out, K] @ [K, N L] took 12.7 ms where [N L, K] @ [K, C_out] took 16.3
    # (1280 -> 1280 over 3 x 4x4 positions, 1 thread; 45.7 against 56.7 over 3 x 8x8)
    y = torch.addmm(bias[:, None], w2, cols) if bias is not None else w2 @ cols  # [C_out, N L]
    return y.view(c_out, n, h_out * w_out).transpose(0, 1).contiguous().view(n, c_out, h_out, w_out)


def conv2d_input_gemm(input_shape, weight: torch.Tensor, grad_out: torch.Tensor, stride, padding, dilation):
    """``torch.nn.grad.conv2d_input`` (groups 1) as one GEMM and col2im: dX ``input_shape`` from
    dY ``[N, C_out, H_out, W_out]``."""
    n, _, h, w = input_shape
    c_out, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    positions = grad_out.shape[2] * grad_out.shape[3]
    dy = grad_out.reshape(n, c_out, positions).transpose(1, 2).reshape(n * positions, c_out)
    dcols = (dy @ weight.reshape(c_out, -1)).view(n, positions, -1).transpose(1, 2)  # [N, K, L]
    return F.fold(dcols, (h, w), (kh, kw), dilation=dilation, padding=padding, stride=stride)


def _eligible(x: torch.Tensor, groups: int) -> bool:
    """Whether the GEMM path may run: on the CPU, groups 1, a map (x, or dY for dX) of at most
    ``MAX_GEMM_POSITIONS`` positions, not while torch.compile traces, not under ``CATFAST_CONV=native``."""
    small_map = x.shape[-2] * x.shape[-1] <= MAX_GEMM_POSITIONS
    cpu = x.device.type == "cpu"
    return cpu and groups == 1 and small_map and not torch.compiler.is_compiling() and setting() != "native"


def _choose(key: tuple, native: Callable[[], torch.Tensor], gemm: Callable[[], torch.Tensor]) -> str:
    if setting() == "gemm":
        return "gemm"
    hit = _choices.get(key)
    if hit is None:
        hit = _choices[key] = _timed_choice(native, gemm)
    return hit


def _timed_choice(native: Callable[[], torch.Tensor], gemm: Callable[[], torch.Tensor]) -> str:
    """Time both (one warm-up each, then interleaved rounds; medians): "gemm" when it wins by MARGIN."""
    times: dict[str, list[float]] = {"native": [], "gemm": []}
    with torch.no_grad():
        native(), gemm()
        for _ in range(_TIMED_ROUNDS):
            for name, fn in (("native", native), ("gemm", gemm)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return "gemm" if statistics.median(times["gemm"]) * MARGIN <= statistics.median(times["native"]) else "native"


def _key(which: str, x_shape, weight: torch.Tensor, stride, padding, dilation) -> tuple:
    return (which, tuple(x_shape), tuple(weight.shape), stride, padding, dilation, weight.dtype,
            torch.get_num_threads())  # fmt: skip


def conv2d_forward(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """``F.conv2d`` by the algorithm chosen for this shape (no autograd of its own: the caller's Function
    or no_grad). Arguments as ``F.conv2d``'s, stride / padding / dilation as pairs."""
    if not _eligible(x, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    key = _key("forward", x.shape, weight, stride, padding, dilation)
    native = lambda: F.conv2d(x, weight, bias, stride, padding, dilation)  # noqa: E731
    gemm = lambda: conv2d_gemm(x, weight, bias, stride, padding, dilation)  # noqa: E731
    return gemm() if _choose(key, native, gemm) == "gemm" else native()


def conv2d_input(input_shape, weight, grad_out, stride, padding, dilation, groups) -> torch.Tensor:
    """``torch.nn.grad.conv2d_input`` by the algorithm chosen for this shape."""
    if not _eligible(grad_out, groups):
        return torch.nn.grad.conv2d_input(input_shape, weight, grad_out, stride, padding, dilation, groups)
    key = _key("input_grad", input_shape, weight, stride, padding, dilation)
    native = lambda: torch.nn.grad.conv2d_input(input_shape, weight, grad_out, stride, padding, dilation)  # noqa: E731
    gemm = lambda: conv2d_input_gemm(input_shape, weight, grad_out, stride, padding, dilation)  # noqa: E731
    return gemm() if _choose(key, native, gemm) == "gemm" else native()


class _FrozenConv2d(torch.autograd.Function):
    """y = conv(x) with a frozen weight; dX by the input-gradient algorithm chosen for the shape. Saves the
    weight only (torch's convolution also saves x, for a weight gradient nobody asks for here)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_args):
        ctx.conv_args, ctx.x_shape = conv_args, x.shape
        ctx.save_for_backward(weight)
        return conv2d_forward(x, weight, bias, *conv_args)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        dx = conv2d_input(ctx.x_shape, weight, grad_out, *ctx.conv_args)
        return dx, None, None, None


def conv2d_by_shape(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a Conv2d whose weight and bias take no gradient, by the algorithms chosen per shape;
    exactly ``conv(x)`` where they do not apply (trainable weights, padding modes other than zeros, string
    padding, autocast, off the CPU)."""
    trainable = conv.weight.requires_grad or (conv.bias is not None and conv.bias.requires_grad)
    if (
        trainable
        or conv.padding_mode != "zeros"
        or not isinstance(conv.padding, tuple)
        or not _eligible(x, conv.groups)
        or torch.is_autocast_enabled(x.device.type)
    ):
        return conv(x)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return conv2d_forward(x, conv.weight, conv.bias, *args)
    return _FrozenConv2d.apply(x, conv.weight, conv.bias, args)
