"""Attach a catfast ``LoraAdapter`` to a diffusers UNet or diffusion transformer (or a transformers text
encoder) as a peft LoRA adapter, and read a peft-attached adapter back (how the trainer saves its result).

The peft config gives every layer its own rank and alpha (exact module names in ``target_modules``,
``rank_pattern`` and ``alpha_pattern``), so the attached model computes the same output as
``catfast.adapters.merge.merge_adapter_``.
"""

from __future__ import annotations

import math

import torch

from catfast.adapters.adapter import DENOISERS, LoraAdapter, LoraLayer, guess_family, layer_key
from catfast.adapters.lora_config import lora_config_kwargs
from catfast.adapters.merge import resolve_targets
from catfast.errors import CatfastError


def attach_adapter(
    model: torch.nn.Module, adapter: LoraAdapter, adapter_name: str = "default", component: str | None = None
) -> list[str]:
    """Add the ``component`` layers of ``adapter`` to ``model`` as peft adapter ``adapter_name`` and
    load its weights; the new adapter becomes the active one (``model.set_adapter``). Returns the
    module names it targets. ``component`` None: the model's denoiser ("unet" for a UNet, "transformer"
    for a Flux/SD3/Qwen-Image transformer).

    An adapter for the other kind of denoiser (a transformer adapter on a UNet, or the reverse) raises a
    one-line CatfastError naming both. Shapes are validated first (AdapterShapeError, model untouched);
    if anything fails after peft has injected layers, the half-made adapter is removed again.
    """
    from peft import LoraConfig  # lazy: peft

    component = component or denoiser_component(model)
    _check_denoiser(model, adapter, component)
    targets = resolve_targets(model, adapter, component)
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise CatfastError(f"{adapter.where()}: the model already has an adapter named {adapter_name!r}")
    layers = {name: adapter.component(component)[path] for path, (name, _) in targets.items()}
    had_peft = bool(getattr(model, "peft_config", None))
    # real module names: anchored patterns (a top-level proj_out is not single_transformer_blocks.0.proj_out)
    model.add_adapter(LoraConfig(**lora_config_kwargs(layers, anchored=True)), adapter_name=adapter_name)
    try:
        _load_weights(model, layers, adapter_name)
    except BaseException:
        _remove(model, adapter_name, had_peft)
        raise
    return sorted(layers)


def denoiser_component(model: torch.nn.Module) -> str:
    """The adapter component of a denoiser: its family's ``denoiser_key`` ("unet", "transformer"); "unet"
    for a model no family knows (catfast's older callers pass UNets)."""
    from catfast.errors import ModelLoadError
    from catfast.integrations.families import family_of  # lazy: diffusers

    try:
        return family_of(model).denoiser_key or "unet"
    except ModelLoadError:
        return "unet"


def _check_denoiser(model: torch.nn.Module, adapter: LoraAdapter, component: str) -> None:
    """Refuse, in one line naming both, an adapter whose only denoiser layers are for the other kind of
    denoiser than ``component`` (the model's)."""
    if component not in DENOISERS or adapter.component(component):
        return
    other = next((c for c in DENOISERS if adapter.component(c)), None)
    if other is None:
        return  # no denoiser layers at all: resolve_targets names what is missing
    family = guess_family(adapter)
    made_for = f"a {other} ({family})" if family and family != other else f"a {other}"
    raise CatfastError(
        f"{adapter.where()} is a LoRA for {made_for}, but the model is a {component} "
        f"({type(model).__name__}); load it into a pipeline of its own family"
    )


@torch.no_grad()
def _load_weights(model: torch.nn.Module, layers: dict[str, LoraLayer], adapter_name: str) -> None:
    named = dict(model.named_modules())
    for name, layer in layers.items():
        wrapper = named[name]
        if wrapper.r[adapter_name] != layer.rank or not math.isclose(
            wrapper.scaling[adapter_name], layer.scale, rel_tol=1e-12
        ):
            raise CatfastError(
                f"peft gave {name} rank {wrapper.r[adapter_name]} / scale {wrapper.scaling[adapter_name]}, "
                f"expected {layer.rank} / {layer.scale}"
            )
        for param, value in (
            (wrapper.lora_A[adapter_name].weight, layer.down),
            (wrapper.lora_B[adapter_name].weight, layer.up),
        ):
            param.copy_(value.reshape(param.shape))


def _remove(model: torch.nn.Module, adapter_name: str, had_peft: bool) -> None:
    """Undo a partial ``attach_adapter``: delete the adapter, and unwrap peft layers if it was the only one."""
    from diffusers.utils import recurse_remove_peft_layers  # lazy: diffusers
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft

    if not had_peft:
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        model._hf_peft_config_loaded = False
        return
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A:
            module.delete_adapter(adapter_name)
    model.peft_config.pop(adapter_name, None)


def extract_adapter(model: torch.nn.Module, adapter_name: str = "default", component: str | None = None) -> LoraAdapter:
    """The peft LoRA adapter ``adapter_name`` of ``model`` as a ``LoraAdapter`` (copies of the weights;
    alpha is peft's ``lora_alpha``, rescaled for rsLoRA so that ``alpha / r`` is the layer's scale).
    ``component`` None: the model's denoiser (``denoiser_component``)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer  # lazy: peft

    component = component or denoiser_component(model)
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name) or getattr(module, "lora_bias", {}).get(adapter_name):
            raise CatfastError(f"{name}: DoRA / lora_bias adapters cannot be extracted as plain LoRA")
        r, alpha = module.r[adapter_name], float(module.lora_alpha[adapter_name])
        if module.use_rslora.get(adapter_name):
            alpha *= math.sqrt(r)
        down = module.lora_A[adapter_name].weight.detach().clone()
        up = module.lora_B[adapter_name].weight.detach().clone()
        layers[layer_key(component, name)] = LoraLayer(down=down, up=up, alpha=alpha)
    if not layers:
        raise CatfastError(f"the model has no peft LoRA adapter named {adapter_name!r}")
    return LoraAdapter(layers=layers, source_format="memory")


def peft_lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every peft LoRA layer (``peft.tuners.lora.LoraLayer``: Linear, Conv2d, ...) of ``model``, in module order."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer  # lazy: peft

    return [m for m in model.modules() if isinstance(m, PeftLoraLayer)]


def adapter_lora_layers(model: torch.nn.Module, adapter_name: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, peft LoRA layer) of every module of ``model`` that carries adapter ``adapter_name``."""
    return [(n, m) for n, m in model.named_modules() if _is_peft_lora(m) and adapter_name in m.lora_A]


def _is_peft_lora(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer  # lazy: peft

    return isinstance(module, PeftLoraLayer)


def add_lora(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: tuple[str, ...] | list[str],
    adapter_name: str = "default",
) -> list[str]:
    """Attach a fresh, trainable peft LoRA (A Kaiming-random, B zero, scale ``alpha / rank``) to every
    module whose name ends with one of ``target_modules``; freeze everything else. Returns the names of
    the LoRA parameters that will train."""
    from peft import LoraConfig  # lazy: peft

    if rank < 1:
        raise CatfastError(f"LoRA rank must be >= 1, got {rank}")
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise CatfastError(f"the model already has an adapter named {adapter_name!r}")
    check_targets(model, target_modules)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True),
        adapter_name=adapter_name,
    )
    return [name for name, p in model.named_parameters() if p.requires_grad]


def check_targets(model: torch.nn.Module, target_modules: tuple[str, ...] | list[str]) -> None:
    """CatfastError naming every LoRA target that matches no module of ``model`` (a target matches a module
    whose name equals it or ends with "." + it, as peft's ``target_modules``). peft itself raises (with a
    traceback) only when no target matches, and silently skips a typo beside a valid name."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        which = "matches" if len(unmatched) == 1 else "match"
        raise CatfastError(
            f"no module of the {type(model).__name__} {which} the LoRA target(s) {','.join(unmatched)} "
            "(suffixes of module names, e.g. to_q, or a preset: attention, locon)"
        )


@torch.no_grad()
def randomize_lora_(module: torch.nn.Module, *, seed: int = 0, std: float = 0.1) -> int:
    """Fill every peft ``lora_A``/``lora_B`` weight with seeded N(0, std^2) values; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for name, p in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            count += 1
    if count == 0:
        raise ValueError("no peft LoRA parameters found to randomise")
    return count
