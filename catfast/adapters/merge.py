"""Apply a LoRA adapter by merging it into the base weights: ``W += scale * (alpha / r) * up @ down``.

Every layer is validated (module exists, is Linear/Conv2d, shapes fit) before any weight changes, so
a failed merge leaves the model untouched. The arithmetic is ``catfast.ops.merge`` (fp32 accumulate).
"""

from __future__ import annotations

import torch

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.errors import AdapterShapeError
from catfast.ops.merge import merge_lora_


def merge_adapter_(module: torch.nn.Module, adapter: LoraAdapter, component: str = "unet", scale: float = 1.0) -> int:
    """Merge the ``component`` layers of ``adapter`` into ``module`` in place; returns the layer count.

    ``scale`` multiplies every layer's own ``alpha / r``. Raises AdapterShapeError (naming the file,
    layer and both shapes) before touching any weight if a layer does not fit.
    """
    weights, downs, ups, scales = _plan(module, adapter, component)
    merge_lora_(weights, downs, ups, [scale * s for s in scales])
    return len(weights)


def unmerge_adapter_(module: torch.nn.Module, adapter: LoraAdapter, component: str = "unet", scale: float = 1.0) -> int:
    """Undo ``merge_adapter_`` with the same arguments (exact up to one rounding per weight element)."""
    weights, downs, ups, scales = _plan(module, adapter, component)
    merge_lora_(weights, downs, ups, [-scale * s for s in scales])
    return len(weights)


def resolve_targets(
    module: torch.nn.Module, adapter: LoraAdapter, component: str = "unet"
) -> dict[str, tuple[str, torch.nn.Module]]:
    """For each ``component`` layer of ``adapter`` (keyed by its path): the module's real name in
    ``module`` and the Linear/Conv2d it targets. Raises AdapterShapeError, naming the file, the layers
    and both shapes, if any module is missing, not Linear/Conv2d, or does not fit."""
    layers = adapter.component(component)
    if not layers:
        raise AdapterShapeError(f"{adapter.where()}: no {component} layers in this adapter")
    named = dict(module.named_modules())
    found, problems = {}, []
    for path, layer in layers.items():
        name = _real_name(named, path)
        target = getattr(named.get(name), "base_layer", named.get(name))  # a peft wrapper merges into its base
        problem = _fit_problem(target, layer)
        if problem:
            problems.append(f"{component}.{path}: {problem}")
        else:
            found[path] = (name, target)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterShapeError(
            f"{adapter.where()} does not fit this {component} (made for another base?): "
            + "; ".join(problems[:3])
            + more
        )
    return found


# Registration refuses a layer whose update ||scale * up @ down|| is more than this many times the norm of
# the base weight it modifies (Frobenius norms, at weight 1). What LoRAs measure: catfast's demo adapters
# (300 steps, rank 4) 0.04-0.45 over their 56 layers (median 0.12), the rank-16 striped-star 0.05-0.62 (as
# measured by the engineer who retrained it, docs/serving.md); the random LoRAs the serving tests
# compare with diffusers (std 0.3 on the tiny UNet) 1.4-10.4, and their pictures are still finite and
# equal diffusers'. For third-party files only absolute norms were at hand (no kohya or diffusers LoRA
# file could be downloaded here): kohya's sd-scripts cap the norm of the same product with
# --scale_weight_norms, which practitioners set near 1 and report never binding at 10 (civitai article
# 14741, "Advanced LoRA Training: Weight Scaling Options"). At ratio 1 the update is as large as the
# weight it changes; 100 is two orders of magnitude above trained LoRAs and nine below a broken file
# (every value 65000 in fp16 measured 1.9e11-3.3e11 on the demo UNet, whose pictures came out black).
MAX_UPDATE_RATIO = 100.0


def stack_layers(parts: list[tuple[LoraLayer, float]]) -> LoraLayer:
    """One LoRA layer whose update is the weighted sum of ``parts`` ``(layer, weight)`` on one module:
    ``sum_i weight_i * scale_i * up_i @ down_i``, exactly (no SVD): the downs stacked along the rank,
    ``[sum r_i, in]``, the ups side by side with each part's weight and scale folded in, ``[out, sum r_i]``,
    and alpha = the summed rank (scale 1). What a row-planned layer needs to give one row several adapters."""
    if not parts:
        raise ValueError("stack_layers needs at least one (layer, weight) pair")
    dtype = parts[0][0].up.dtype
    down = torch.cat([layer.down.to(dtype) for layer, _ in parts])
    up = torch.cat([layer.up.to(dtype) * (w * layer.scale) for layer, w in parts], dim=1)
    return LoraLayer(down, up, alpha=float(down.shape[0]))


def update_ratio(layer: LoraLayer, weight_norm: float) -> float:
    """||scale * up @ down||_F / ``weight_norm`` (the Frobenius norm of the weight the layer modifies; inf
    when that is zero and the update is not). Computed from the r x r Gram matrices in float64 on the CPU,
    never forming the full product: ||U D||^2 = sum((U^T U) * (D D^T))."""
    u = layer.up.detach().flatten(1).to("cpu", torch.float64)
    d = layer.down.detach().flatten(1).to("cpu", torch.float64)
    update = abs(layer.scale) * float(((u.T @ u) * (d @ d.T)).sum().clamp_min(0).sqrt())
    if weight_norm == 0.0:
        return 0.0 if update == 0.0 else float("inf")
    return update / weight_norm


def _plan(module, adapter, component):
    targets = resolve_targets(module, adapter, component)
    layers = adapter.component(component)
    weights = [targets[p][1].weight for p in targets]
    downs = [layers[p].down.to(w.device) for p, w in zip(targets, weights)]
    ups = [layers[p].up.to(w.device) for p, w in zip(targets, weights)]
    return weights, downs, ups, [layers[p].scale for p in targets]


def _real_name(named: dict[str, torch.nn.Module], path: str) -> str:
    """``path`` as named in the model: text-encoder paths may lack ``text_model.`` (transformers 5
    flattens CLIPTextModel)."""
    if path not in named and path.startswith("text_model.") and path.removeprefix("text_model.") in named:
        return path.removeprefix("text_model.")
    return path


def _fit_problem(target: torch.nn.Module | None, layer: LoraLayer) -> str | None:
    """Why ``layer`` cannot merge into ``target`` (None if it can)."""
    if target is None:
        return "no such module"
    if not isinstance(target, (torch.nn.Linear, torch.nn.Conv2d)):
        return f"is a {type(target).__name__}, not Linear/Conv2d"
    if isinstance(target, torch.nn.Conv2d) and target.groups != 1:
        return f"is a grouped Conv2d (groups={target.groups})"
    w, down, up = target.weight, layer.down, layer.up
    fits = (
        up.shape[0] == w.shape[0]
        and down.flatten(1).shape[1] == w[0].numel()
        and (down.ndim == 2 or tuple(down.shape[1:]) == tuple(w.shape[1:]) or tuple(down.shape[2:]) == (1, 1))
    )
    if not fits:
        return f"weight {tuple(w.shape)} vs LoRA down {tuple(down.shape)} / up {tuple(up.shape)}"
    return None
