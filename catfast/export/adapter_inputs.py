"""LoRA weights as graph inputs: a module transform for export, so that one ONNX graph serves many adapters.

Every targeted Linear/Conv2d is swapped for a `LoraInputLayer` that computes

    Y = base(X) + (X @ A^T) @ B^T            (conv: conv(conv(X, A, base stride/padding), B 1x1))

with A (down, ``[r, in]`` or ``[r, in, kh, kw]``) and B (up, ``[out, r]`` or ``[out, r, 1, 1]``) handed in
per call instead of stored. `LoraInputsGraph` wraps a graph module (whose forward takes the component's own
inputs) and takes the LoRA tensors as extra forward arguments, routing each pair into its layer; traced by
the ONNX exporter they become graph inputs named ``<module path>.lora_A`` / ``<module path>.lora_B`` with a
dynamic rank axis per layer, so each adapter keeps its own ranks. The adapter's scale (alpha / r times the
user's scale) is folded into B by `adapter_feeds`, which builds the tensors one adapter feeds; a layer the
adapter does not touch gets a rank-1 zero pair (exactly the base output).

Patching follows the repo rule: module instances are swapped (never classes), `attach_lora_inputs` returns
what it changed, and `detach_lora_inputs` puts the original modules back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from catfast.adapters.adapter import LoraAdapter
from catfast.adapters.merge import resolve_targets
from catfast.errors import AdapterShapeError


@dataclass(frozen=True)
class LoraInputSpec:
    """One LoRA-input layer: its module path in the component, the two graph input names, and the shapes of
    A and B with the rank left out (A = [rank, *down_rest], B = [up_out, rank, *up_rest])."""

    path: str
    name_a: str
    name_b: str
    kind: str  # "linear" or "conv"
    down_rest: tuple[int, ...]
    up_out: int
    up_rest: tuple[int, ...]

    def zeros(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """A rank-1 zero pair: feeding it gives the base layer's output exactly."""
        return torch.zeros((1, *self.down_rest), dtype=dtype), torch.zeros((self.up_out, 1, *self.up_rest), dtype=dtype)


class LoraInputLayer(torch.nn.Module):
    """A Linear/Conv2d plus a LoRA whose A/B are set from outside for one call (`down`/`up` attributes,
    already scaled). With none set it is the base layer."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        if isinstance(base, torch.nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise AdapterShapeError(f"LoRA inputs need a plain Conv2d (groups=1, zero padding), got {base}")
        self.base = base
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.down is None:
            return y
        if isinstance(self.base, torch.nn.Linear):
            return y + F.linear(F.linear(x, self.down), self.up)
        b = self.base
        h = F.conv2d(x, self.down, None, b.stride, b.padding, b.dilation)
        return y + F.conv2d(h, self.up)


def lora_input_specs(
    model: torch.nn.Module, adapters: list[LoraAdapter], component: str = "unet"
) -> list[LoraInputSpec]:
    """The union of the ``component`` layers of ``adapters`` that ``model`` has, in the model's module order.
    Every adapter is checked against the model first (AdapterShapeError naming the file, layer and shapes)."""
    wanted: dict[str, torch.nn.Module] = {}
    for adapter in adapters:
        if adapter.component(component):
            for name, target in resolve_targets(model, adapter, component).values():
                wanted[name] = target
    specs = []
    for name, module in model.named_modules():
        target = wanted.get(name)
        if target is None:
            continue
        w = target.weight
        if isinstance(target, torch.nn.Linear):
            specs.append(
                LoraInputSpec(name, f"{name}.lora_A", f"{name}.lora_B", "linear", (w.shape[1],), w.shape[0], ())
            )
        else:
            specs.append(
                LoraInputSpec(name, f"{name}.lora_A", f"{name}.lora_B", "conv", tuple(w.shape[1:]), w.shape[0], (1, 1))
            )
    return specs


def attach_lora_inputs(model: torch.nn.Module, specs: list[LoraInputSpec]) -> dict[str, LoraInputLayer]:
    """Swap each spec's module in ``model`` for a `LoraInputLayer` around it; returns path -> new layer."""
    swapped = {}
    for spec in specs:
        parent_name, _, child = spec.path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        if isinstance(original, LoraInputLayer):
            raise ValueError(f"{spec.path} already takes LoRA inputs")
        layer = LoraInputLayer(original)
        setattr(parent, child, layer)
        swapped[spec.path] = layer
    return swapped


def detach_lora_inputs(model: torch.nn.Module) -> list[str]:
    """Put back the original module of every `LoraInputLayer` in ``model``; returns their paths."""
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraInputLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
            restored.append(name)
    return restored


class LoraInputsGraph(torch.nn.Module):
    """``graph`` (a module whose forward takes ``num_inputs`` tensors) with LoRA A/B as extra inputs:
    ``forward(*inputs, A_0, B_0, A_1, B_1, ...)`` in ``specs`` order. ``lora_root`` is the submodule the spec
    paths are relative to (e.g. the UNet inside the graph wrapper); its layers are swapped in place."""

    def __init__(self, graph: torch.nn.Module, lora_root: torch.nn.Module, specs: list[LoraInputSpec], num_inputs: int):
        super().__init__()
        self.graph = graph
        self.specs = list(specs)
        self.num_inputs = num_inputs
        self._layers = list(attach_lora_inputs(lora_root, self.specs).values())

    def input_names(self) -> list[str]:
        return [n for s in self.specs for n in (s.name_a, s.name_b)]

    def forward(self, *args: torch.Tensor):
        inputs, lora = args[: self.num_inputs], args[self.num_inputs :]
        if len(lora) != 2 * len(self._layers):
            raise ValueError(f"expected {2 * len(self._layers)} LoRA tensors, got {len(lora)}")
        for i, layer in enumerate(self._layers):
            layer.down, layer.up = lora[2 * i], lora[2 * i + 1]
        try:
            return self.graph(*inputs)
        finally:
            for layer in self._layers:
                layer.down = layer.up = None


def adapter_feeds(
    adapter: LoraAdapter | None,
    specs: list[LoraInputSpec],
    component: str = "unet",
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The LoRA inputs (input name -> tensor) that apply ``adapter`` at ``scale``: A as stored, B times
    ``scale * alpha / r`` (computed in fp32, then cast to ``dtype``); rank-1 zeros for layers the adapter
    does not have (None: the base model). Layers of the adapter that no spec covers are an error."""
    layers = adapter.component(component) if adapter is not None else {}
    covered = {s.path for s in specs}
    stray = [p for p in layers if p not in covered and p.removeprefix("text_model.") not in covered]
    if stray:
        raise AdapterShapeError(
            f"{adapter.where()}: {len(stray)} {component} layers are not inputs of this graph (e.g. {stray[0]}); "
            "export with this adapter among --adapter to include them"
        )
    feeds = {}
    for spec in specs:
        layer = layers.get(spec.path) or layers.get(f"text_model.{spec.path}")
        if layer is None:
            down, up = spec.zeros(dtype)
        else:
            r = layer.rank
            down = layer.down.float().reshape(r, *spec.down_rest)
            up = (layer.up.float() * (scale * layer.scale)).reshape(spec.up_out, r, *spec.up_rest)
            down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        feeds[spec.name_a], feeds[spec.name_b] = down, up
    return feeds
