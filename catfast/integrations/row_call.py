"""One home for a row-planned UNet call: patch if needed, refuse what cannot be planned, set the plan, run,
clear the plan, and unpatch what was patched for the call.

Three callers:
- the CAT objective (``catfast.train.objective``, mode "fused"): ``planned_unet(..., purpose="fused")``
  then ``call.plan_rows(...)`` around its one UNet call with grad rows;
- the batched sampler (``catfast.eval.sampler``): ``planned_unet(..., purpose="sample")``, plans per
  sampler run;
- the serving engine (``catfast.serve``): its UNet carries ``SlotLora`` hooks instead of peft layers
  (no patching), and ``run_segmented`` sets a ``SegmentPlan`` for one call.

Refusals (a row plan that would silently give some rows the wrong adapter): a peft LoRA layer that
cannot be patched (it would apply the active adapter to every row), disabled adapters (patched layers
would ignore the plan), and, for a temporary patch, gradient checkpointing (backward recomputes the
blocks after the patch is undone).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

from catfast.errors import CatfastError, ModelLoadError
from catfast.integrations.families import family_of
from catfast.integrations.patch import patch_report, patch_unet, patched_lora_layers, row_plan, unpatch_unet
from catfast.rows import NO_ADAPTER, RowPlan

_log = logging.getLogger("catfast.train")

__all__ = ["PlannedUnet", "planned_unet", "run_segmented", "unplannable"]


class PlannedUnet:
    """A UNet ready for row-planned calls: ``slot_of`` maps adapter names (and None = the base model) to
    plan slots; ``patched`` is False for a UNet without any adapter (every row is a base row: no plan,
    plain calls)."""

    def __init__(self, unet: torch.nn.Module, report, slot_of: dict):
        self.unet, self.report, self.slot_of = unet, report, slot_of
        self.patched = report is not None

    def slots(self, adapters: Sequence[str | None]) -> list[int]:
        return [self.slot_of[a] for a in adapters]

    @contextlib.contextmanager
    def plan_rows(self, plan: RowPlan | None, *, identical_groups: int = 1, twin_groups: bool = False):
        """Within the block every patched layer computes with ``plan`` (None or an unpatched UNet: plain)."""
        if plan is None or not self.patched:
            yield
            return

        with row_plan(self.unet, plan, identical_groups=identical_groups, twin_groups=twin_groups):
            yield


@contextlib.contextmanager
def planned_unet(
    unet: torch.nn.Module,
    adapters: Sequence[str | None],
    *,
    purpose: str,
    error: type[Exception] = CatfastError,
):
    """Yield a ``PlannedUnet`` for rows using ``adapters`` (None = the base model); the UNet is patched
    for the block when it was not (and unpatched after), or used with the slots it is patched with.

    purpose: "fused" (the CAT objective: the UNet must have LoRA adapters; a temporary patch refuses
    gradient checkpointing) or "sample" (a plain UNet is allowed: base rows only; disabled adapters are
    refused). ``error``: the exception class of refusals (the objective raises ValueError, the sampler
    CatfastError). Messages name what to do."""

    if purpose not in ("fused", "sample"):
        raise ValueError(f"purpose must be 'fused' or 'sample', got {purpose!r}")
    names = list(dict.fromkeys(a for a in adapters if a is not None))
    configs = getattr(unet, "peft_config", None) or {}
    missing = [name for name in names if name not in configs]
    if missing:
        raise error(f"the {_kind(unet)} has no adapter named {missing[0]!r} (it has {list(configs) or 'none'})")
    if not configs and purpose == "sample":  # a plain UNet: every row is a base row, no plan needed
        yield PlannedUnet(unet, None, {None: None})
        return
    temporary = patch_report(unet) is None
    if purpose == "fused" and temporary and getattr(unet, "is_gradient_checkpointing", False):
        # the backward recomputes checkpointed blocks after this call returns: they need the row-planned
        # layers then, so the patch stays (what the trainer does for every fused run)
        temporary = False
        _log.info("fused CAT with gradient checkpointing: the UNet stays patched for row plans (its backward "
                  "recomputes blocks with them); catfast.integrations.patch.unpatch_unet(unet) undoes it")  # fmt: skip
    report = patch_unet(unet)
    try:
        problem = unplannable(unet, report, check_disabled=purpose == "sample")
        if problem:
            if purpose == "fused":
                raise error(f"mode='fused' cannot row-plan {problem}; use mode='reference'")
            raise error(f"cannot sample with a row plan: {problem}")
        slot_of = {None: NO_ADAPTER, **{name: i for i, name in enumerate(report.slots)}}
        yield PlannedUnet(unet, report, slot_of)
    finally:
        if temporary:
            unpatch_unet(unet)


def unplannable(unet: torch.nn.Module, report, *, check_disabled: bool = True) -> str | None:
    """Why a row plan would not give each row its own adapter, or None. A peft layer left unpatched would
    apply the active adapter to every row; a disabled adapter makes patched layers ignore the plan."""

    if report.skipped:
        name, why = next(iter(report.skipped.items()))
        return f"{len(report.skipped)} LoRA layer(s), e.g. {name}: {why}"
    if check_disabled:
        for module in patched_lora_layers(unet):
            if module.peft_layer.disable_adapters:
                kind = _kind(unet)
                return f"the {kind}'s adapters are disabled (disable_adapters()); call enable_adapters() first"
    return None


def _kind(model: torch.nn.Module) -> str:
    """ "UNet" or "transformer": what error messages call the denoiser (its family's ``denoiser_key``; "model"
    for a module no family knows)."""
    try:
        key = family_of(getattr(model, "_orig_mod", model)).denoiser_key
    except ModelLoadError:
        return "model"
    return "UNet" if key == "unet" else "transformer"


def run_segmented(unet: torch.nn.Module, holder, plan, sample, timestep, **kwargs) -> torch.Tensor:
    """One no-grad UNet call of a serving UNet (``SlotLora`` hooks sharing ``holder``) with segment plan
    ``plan``; returns the UNet's sample output. The plan is cleared afterwards, whatever happens."""
    if holder.plan is not None:
        raise RuntimeError("a segment plan is already set on this UNet")
    if len(plan) != sample.shape[0]:
        raise ValueError(f"segment plan has {len(plan)} rows but the batch has {sample.shape[0]}")
    holder.plan = plan
    try:
        with torch.no_grad():
            return unet(sample, timestep, return_dict=False, **kwargs)[0]
    finally:
        holder.plan = None
