"""A frozen Linear whose weight is stored as float8 e4m3 with per-output-channel scales (``--base-dtype fp8``),
and the pass that puts it in place of a transformer's frozen Linears.

``Fp8Linear`` computes what the Linear it replaces computed with its dequantized weight
(``catfast.ops.fp8``: ``y = x @ (W8 * scale[:, None]).T + b`` in x's dtype); the weight gets no gradient, the
input gradient flows. It holds ``weight_fp8 [out, in]`` (1 byte an element) and ``weight_scale [out]`` (fp32) as
buffers and the bias as a frozen Parameter; ``.to(dtype)`` casts the bias only (the fp8 weight and its scales
keep their dtypes and follow device moves).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from catfast.ops.fp8 import dequantize_fp8, fp8_linear, quantize_fp8

_FP8_BUFFERS = ("weight_fp8", "weight_scale")


class Fp8Linear(torch.nn.Module):
    """``torch.nn.Linear``'s forward on a float8 e4m3 weight with one fp32 scale per output channel (frozen)."""

    def __init__(self, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = w8.shape
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device=None) -> Fp8Linear:
        """The fp8 stand-in of ``linear`` (quantized on ``device``, default the weight's; the bias keeps its
        dtype)."""
        weight = linear.weight.detach()
        w8, scale = quantize_fp8(weight.to(device) if device is not None else weight)
        bias = linear.bias
        return cls(w8, scale, None if bias is None else bias.detach().to(w8.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, ``[out, in]`` of ``dtype`` (a new tensor)."""
        return dequantize_fp8(self.weight_fp8, self.weight_scale, dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, float8 included: the fp8 weight and its fp32 scales
        # take only the device of what ``fn`` makes of them
        kept = {name: self._buffers.pop(name) for name in _FP8_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, fp8 e4m3"


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class Fp8Report:
    """What ``quantize_frozen_linears_`` did: the swapped Linears' names, their bytes before and after (weights,
    scales, biases), and the whole model's parameter and buffer bytes before and after."""

    quantized: list[str] = field(default_factory=list)
    layer_bytes_before: int = 0
    layer_bytes_after: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    def line(self) -> str:
        ratio = self.model_bytes_after / max(self.model_bytes_before, 1)
        layers = self.layer_bytes_after / max(self.layer_bytes_before, 1)
        return (
            f"fp8 base: {len(self.quantized)} frozen Linears as float8 e4m3 (per-channel scales), "
            f"{self.layer_bytes_before / 2**20:.1f} -> {self.layer_bytes_after / 2**20:.1f} MiB ({layers:.3f}x); "
            f"the model's parameters and buffers {self.model_bytes_before / 2**20:.1f} -> "
            f"{self.model_bytes_after / 2**20:.1f} MiB ({ratio:.3f}x)"
        )


def _is_lora_part(name: str) -> bool:
    """Whether module ``name`` lies inside a peft LoRA layer's own adapter weights (lora_A, lora_B, ...)."""
    return any(part.startswith("lora_") for part in name.split("."))


@torch.no_grad()
def quantize_frozen_linears_(model: torch.nn.Module, *, skip: Iterable[str] = (), device=None) -> Fp8Report:
    """Replace, in place, every frozen ``torch.nn.Linear`` of ``model`` (exactly that class; weight and bias
    without grad) by an ``Fp8Linear``: the base_layer inside a peft LoRA layer too (peft calls
    ``self.base_layer(x)``), never a LoRA layer's own lora_A / lora_B. ``skip``: names (or dotted name suffixes)
    of Linears to leave as they are. ``device``: where each weight is quantized and its fp8 copy kept (default:
    where it is), one layer at a time, so a model larger than that device in full precision can be loaded on
    the CPU and quantized onto it. Returns an ``Fp8Report``."""
    skip = tuple(skip)
    report = Fp8Report(model_bytes_before=tensor_bytes(model))
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not name or type(module) is not torch.nn.Linear or _is_lora_part(name):
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
            continue
        parent_name, _, child = name.rpartition(".")
        stand_in = Fp8Linear.from_linear(module, device)
        report.layer_bytes_before += tensor_bytes(module)
        report.layer_bytes_after += tensor_bytes(stand_in)
        setattr(modules[parent_name], child, stand_in)
        report.quantized.append(name)
    report.model_bytes_after = tensor_bytes(model)
    return report
