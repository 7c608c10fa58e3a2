"""Swap the peft LoRA layers of a diffusers denoiser (a UNet, or a transformer of ``integrations.families``)
for catfast's row-planned layers, and back.

Instance-level and reversible: ``patch_unet`` replaces each supported peft layer instance in its
parent module by a ``RowLoraLayer`` that shares its parameters (no copies), each other Conv2d /
Linear by a row-aware frozen stand-in (same parameters, same names), and, where the model's family allows
it (``row_attention``: UNets), sets a row-aware attention processor (diffusers' official
``set_attn_processor``). ``unpatch_unet`` puts the original instances
and processors back, so the UNet is exactly what it was. Nothing global is changed. Without a row
plan, every patched module computes exactly what the original does.

``unpatch_unet`` keeps the stand-ins it removed (in a plain attribute of the UNet, not a submodule: no
parameter, no state_dict key), and the next ``patch_unet`` with the same slots puts them back when the
module tree still holds the same instances: ``cat_loss(mode="fused")`` on an unpatched UNet patches and
unpatches every step, and building the patch from scratch (walking the module tree twice and diffusers'
recursive processor getter and setter) cost 16.4 ms a step on the small UNet, 1 thread (3% of a 2-thread
step on the dev CPU); putting the cached stand-ins back costs well under a millisecond.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from catfast.integrations.families import family_of
from catfast.nn.plan_holder import PlanHolder
from catfast.nn.row_frozen import RowAttnProcessor, RowFrozenConv2d, RowFrozenLinear
from catfast.nn.row_lora import RowLoraLayer
from catfast.rows import RowPlan

_STATE = "_catfast_patch"
_CACHE = "_catfast_patch_cache"  # the _PatchState of the last patch undone, for the next patch_unet


@dataclass
class PatchReport:
    """What ``patch_unet`` changed: patched LoRA layers, skipped ones with the reason, adapter slots,
    the frozen Conv2d/Linear layers made row-aware, and the attention modules given the row-aware
    processor."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    slots: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)


@dataclass
class _PatchState:
    holder: PlanHolder
    originals: dict[str, torch.nn.Module]
    processors: dict
    report: PatchReport
    # (parent module, child name, original, stand-in) of every swapped module
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]] = field(default_factory=list)
    # (owner, child name, module) for every module on the way from the UNet to a swapped module's parent
    path: list[tuple[torch.nn.Module, str, torch.nn.Module]] = field(default_factory=list)
    # (attention module, its original processor, the row-aware one)
    attention: list[tuple[torch.nn.Module, object, object]] = field(default_factory=list)
    # (peft layer, why it is skipped) of the layers left unpatched
    skipped: list[tuple[torch.nn.Module, str]] = field(default_factory=list)
    # the modules that have a ``gradient_checkpointing`` flag (diffusers' blocks), read by row_plan
    checkpointable: list[torch.nn.Module] = field(default_factory=list)
    parameters: tuple[torch.nn.Parameter, ...] = ()  # the UNet's parameters when the patch was built
    # the row sharing the model's family declares sound for it (families.DenoiserFamily.row_sharing)
    sharing: tuple[str, ...] = ()


def patch_unet(unet: torch.nn.Module, adapters: list[str] | None = None) -> PatchReport:
    """Patch every peft LoRA Linear and Conv2d of ``unet``; slot i is adapter ``adapters[i]``
    (default: every peft adapter, in ``unet.peft_config`` order). Idempotent: a patched UNet returns its
    existing report when the slots are the same, and raises when they differ."""
    from peft.tuners.lora import Conv2d as PeftConv2d  # lazy: peft
    from peft.tuners.lora import Linear as PeftLinear  # lazy: peft

    unet = _inner(unet)
    configs = getattr(unet, "peft_config", None)
    if not configs:
        raise ValueError("the model has no LoRA adapter: attach one with model.add_adapter(LoraConfig(...))")
    slots = list(adapters) if adapters is not None else list(configs)
    missing = [name for name in slots if name not in configs]
    if missing:
        raise ValueError(f"no adapter named {missing[0]!r} on the UNet (it has {list(configs)})")
    state = getattr(unet, _STATE, None)
    if state is not None:
        if state.report.slots != slots:
            raise ValueError(f"the UNet is patched with slots {state.report.slots}; unpatch_unet first")
        return state.report

    cached = unet.__dict__.get(_CACHE)
    if cached is not None and cached.report.slots == slots and _reapply(unet, cached):
        return cached.report

    report, holder, originals = PatchReport(slots=slots), PlanHolder(), {}
    modules = dict(unet.named_modules())
    state = _PatchState(holder, originals, {}, report)
    for name, module in modules.items():
        if not isinstance(module, (PeftLinear, PeftConv2d)):
            continue
        reason = _unsupported(module, slots)
        if reason is not None:
            report.skipped[name] = reason
            state.skipped.append((module, reason))
            continue
        _swap(unet, modules, state, name, RowLoraLayer(module, slots, holder))
        report.patched.append(name)
    for name, module in modules.items():
        if name in originals or any(part in name.split(".") for part in ("base_layer", "lora_A", "lora_B")):
            continue
        kind = {torch.nn.Conv2d: RowFrozenConv2d, torch.nn.Linear: RowFrozenLinear}.get(type(module))
        if kind is None:
            continue
        _swap(unet, modules, state, name, kind(module, holder))
        report.frozen.append(name)
    family = family_of(unet)
    state.sharing = family.row_sharing(unet)
    if family.row_attention:
        processors = dict(unet.attn_processors)
        row_processors = {name: RowAttnProcessor(holder, proc) for name, proc in processors.items()}
        unet.set_attn_processor(dict(row_processors))
        state.processors = processors
        state.attention = [
            (modules[name.removesuffix(".processor")], processors[name], row_processors[name]) for name in processors
        ]
    state.checkpointable = [m for m in modules.values() if "gradient_checkpointing" in m.__dict__]
    state.parameters = tuple(unet.parameters())
    report.attention = sorted(state.processors)
    unet.__dict__.pop(_CACHE, None)
    setattr(unet, _STATE, state)
    return report


def fused_blocker(model: torch.nn.Module, per_sample_adapters: bool) -> str | None:
    """Why the fused CAT step (a row-planned call) would refuse this unpatched peft UNet, or None.
    ``per_sample_adapters``: the caller names each sample's adapter (else the one active adapter is used)."""
    from peft.tuners.lora import Conv2d as PeftConv2d  # lazy: peft
    from peft.tuners.lora import Linear as PeftLinear  # lazy: peft

    if not getattr(model, "peft_config", None):
        return "no LoRA adapter"
    if not per_sample_adapters and len(model.active_adapters()) != 1:
        return "several active adapters and no per-sample adapters"
    slots = list(getattr(model, "peft_config", {}) or {}) if per_sample_adapters else model.active_adapters()
    for name, module in model.named_modules():
        if isinstance(module, (PeftLinear, PeftConv2d)):
            reason = _unsupported(module, slots)
            if reason is not None:
                return f"{name}: {reason}"
    return None


def _swap(unet, modules: dict, state: _PatchState, name: str, stand_in: torch.nn.Module) -> None:
    """Put ``stand_in`` where module ``name`` is, and record it in ``state``."""
    parent_name, _, child = name.rpartition(".")
    parent = modules[parent_name]
    original = parent._modules[child]
    setattr(parent, child, stand_in)
    state.originals[name] = original
    state.swaps.append((parent, child, original, stand_in))
    known = {id(m) for _, _, m in state.path}
    owner_name = ""
    for part in parent_name.split(".") if parent_name else ():
        owner = modules[owner_name]
        owner_name = f"{owner_name}.{part}" if owner_name else part
        if id(modules[owner_name]) not in known:
            state.path.append((owner, part, modules[owner_name]))
            known.add(id(modules[owner_name]))


def _reapply(unet, state: _PatchState) -> bool:
    """Put the stand-ins of an undone patch back, if the UNet still holds the same modules (and the same
    LoRA layers are, and are not, supported) and the same attention processors; False (nothing changed)
    otherwise. The stand-ins re-read what may have changed meanwhile: LoRA scalings and frozen parameters."""
    slots = state.report.slots
    if any(owner._modules.get(part) is not module for owner, part, module in state.path):
        return False
    if any(parent._modules.get(child) is not original for parent, child, original, _ in state.swaps):
        return False
    if any(getattr(attn, "processor", None) is not original for attn, original, _ in state.attention):
        return False
    if any(_unsupported(module, slots) != reason for module, reason in state.skipped):
        return False
    if any(isinstance(s, RowLoraLayer) and _unsupported(o, slots) is not None for _, _, o, s in state.swaps):
        return False
    if not all(stand_in.matches() for _, _, _, stand_in in state.swaps):
        return False
    for parent, child, _, stand_in in state.swaps:
        stand_in.refresh()
        parent._modules[child] = stand_in  # what setattr does for a child module already there, ~10x faster
    for attn, _, row in state.attention:
        attn.set_processor(row)
    state.holder.set(None)
    unet.__dict__.pop(_CACHE, None)
    setattr(unet, _STATE, state)
    return True


def _unsupported(module: torch.nn.Module, slots: list[str]) -> str | None:
    base = module.base_layer
    if isinstance(base, torch.nn.Conv2d) and (
        base.groups != 1 or base.padding_mode != "zeros" or not isinstance(base.padding, tuple)
    ):
        return f"Conv2d with groups={base.groups}, padding={base.padding!r} ({base.padding_mode})"
    for name in slots:
        if name not in module.lora_A:  # a slot whose adapter does not target this layer adds nothing here
            continue
        if module.use_dora.get(name):
            return "DoRA"
        if getattr(module, "lora_bias", {}).get(name):
            return "lora_bias (a bias on lora_B)"
        dropout = module.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            return f"lora_dropout={dropout.p} (the fused op has no dropout)"
    return None


def _inner(unet: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper holds (its ``named_modules`` prefix every name with
    ``_orig_mod.``), or ``unet`` itself: the patch and its state live on the UNet, and the compiled
    wrapper's calls run the patched modules."""
    return getattr(unet, "_orig_mod", unet)


def unpatch_unet(unet: torch.nn.Module) -> PatchReport:
    """Put back the original peft layers; returns the report of the patch it undid."""
    unet = _inner(unet)
    state = getattr(unet, _STATE, None)
    if state is None:
        raise ValueError("the UNet is not patched")
    for parent, child, original, _ in state.swaps:
        parent._modules[child] = original  # what setattr does for a child module already there, ~10x faster
    for attn, original, _ in state.attention:
        attn.set_processor(original)
    state.holder.adapters_frozen = False  # a later patch reusing these stand-ins makes no such promise
    delattr(unet, _STATE)
    unet.__dict__[_CACHE] = state
    return state.report


def patched_lora_layers(unet: torch.nn.Module) -> list[RowLoraLayer]:
    """The row-planned LoRA layers the current patch put in (none when the UNet is not patched): a list kept
    by the patch, not a walk of the module tree (which cost serving a DiT a growing share of each run)."""
    state = getattr(_inner(unet), _STATE, None)
    return [] if state is None else [s for _, _, _, s in state.swaps if isinstance(s, RowLoraLayer)]


def trust_adapter_weights(unet: torch.nn.Module, trusted: bool = True) -> None:
    """Promise (or withdraw the promise) that the patched adapters' LoRA weights do not change while the
    model stays patched, as a server's pool that attaches and detaches adapters only while unpatched can:
    the row-planned layers then reuse their no_grad stacks of every slot's A and B without checking each
    parameter per call (a check that grows with the resident adapters). Undone by ``unpatch_unet``."""
    state = getattr(_inner(unet), _STATE, None)
    if state is None:
        raise ValueError("the model is not patched")
    state.holder.adapters_frozen = trusted


def patch_report(unet: torch.nn.Module) -> PatchReport | None:
    """The report of the current patch, or None when the UNet is not patched."""
    state = getattr(unet, _STATE, None)
    return None if state is None else state.report


def active_adapters(unet: torch.nn.Module) -> list[str]:
    """The UNet's active peft adapters, patched or not (while patched, diffusers' ``active_adapters()``
    finds no peft layer in the module tree and returns None)."""
    state = getattr(unet, _STATE, None)
    if state is None:
        return list(unet.active_adapters() or [])
    first = next((state.originals[name] for name in state.report.patched), None)
    return list(first.active_adapters) if first is not None else []


@contextlib.contextmanager
def row_plan(unet: torch.nn.Module, plan: RowPlan, identical_groups: int = 1, twin_groups: bool = False):
    """Within the block, every patched layer of ``unet`` computes with ``plan``.

    ``identical_groups=G`` promises that the call's inputs (sample and timestep) are G identical groups
    of consecutive samples, so the prefix before the first LoRA layer or cross-attention runs once for
    one group. ``twin_groups`` adds that groups 0 and 1 have the same plan too (they differ only in the
    text condition), so they are computed once until the first cross-attention (see
    catfast.nn.plan_holder). Both are ignored where the model's family does not declare them sound for it
    (``DenoiserFamily.row_sharing``: UNets whose prefix reads other inputs, such as SDXL's added text
    embeddings; transformers, whose text enters every block)."""
    state = getattr(unet, _STATE, None)
    if state is None:
        raise ValueError("row_plan needs a patched UNet: call catfast.integrations.patch.patch_unet(unet) first")
    if state.holder.plan is not None:
        raise RuntimeError("a row plan is already set on this UNet")
    plan.validate(num_slots=len(state.report.slots))
    if identical_groups < 1 or len(plan) % identical_groups:
        raise ValueError(f"identical_groups={identical_groups} does not divide the {len(plan)} rows of the plan")
    if "prefix" not in state.sharing:
        identical_groups = 1
    state.holder.set(plan, identical_groups, twin_groups and "twins" in state.sharing)
    checkpointed = [m for m in state.checkpointable if m.gradient_checkpointing]
    originals = [m._gradient_checkpointing_func for m in checkpointed]
    for module, func in zip(checkpointed, originals):
        module._gradient_checkpointing_func = _replaying_plan(state.holder, func)
    try:
        yield
    finally:
        for module, func in zip(checkpointed, originals):
            module._gradient_checkpointing_func = func
        state.holder.set(None)


def _replaying_plan(holder: PlanHolder, checkpoint_func):
    """diffusers' gradient-checkpointing function, with the block's recomputation (during backward,
    after the row plan is gone) run under the row-plan state the block saw in the forward; without it
    the recomputed rows would take the plain peft path and the gradients would be silently wrong."""

    def checkpointed(block, *args):
        seen = holder.snapshot()

        def run(*inputs):
            if holder.plan is seen["plan"]:  # the forward itself
                return block(*inputs)
            current = holder.snapshot()
            holder.restore(seen)
            try:
                return block(*inputs)
            finally:
                holder.restore(current)

        return checkpoint_func(run, *args)

    return checkpointed
