"""catfast.integrations.row_call, the one home of row-planned UNet calls: patching for the block only,
refusals, slots, and the serving call that always clears its plan."""

from __future__ import annotations

import pytest
import torch

from catfast.errors import CatfastError
from catfast.integrations.factory import build_unet
from catfast.integrations.patch import patch_report, patch_unet, unpatch_unet
from catfast.integrations.peft_adapters import add_lora
from catfast.integrations.row_call import planned_unet, run_segmented
from catfast.nn.slot_lora import SlotHolder, SlotLora
from catfast.ops.segmented import Segment, SegmentPlan
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import randomize_lora_

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _unet(*adapters):
    unet = build_unet("tiny")
    for name, rank in adapters:
        add_lora(unet, rank=rank, alpha=rank, target_modules=ATTN, adapter_name=name)
    if adapters:
        randomize_lora_(unet, seed=0, std=0.3)
    return unet


def _inputs(rows):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, 4, 16, 16, generator=g), torch.tensor([10] * rows), torch.randn(rows, 77, 32, generator=g)


def test_patches_for_the_block_only_and_gives_each_row_its_adapter():
    unet = _unet(("a", 4), ("b", 2))
    x, t, h = _inputs(3)
    with torch.no_grad(), planned_unet(unet, ["a", None, "b"], purpose="sample") as call:
        assert patch_report(unet) is not None and call.patched
        slots = call.slots(["a", None, "b"])
        assert slots == [0, NO_ADAPTER, 1]
        with call.plan_rows(RowPlan.build(slots, needs_grad=False)):
            mixed = unet(x, t, encoder_hidden_states=h).sample
    assert patch_report(unet) is None  # unpatched again
    with torch.no_grad():
        for row, name in enumerate(["a", None, "b"]):
            if name is None:
                unet.disable_adapters()
            else:
                unet.set_adapter(name)
            alone = unet(x[row : row + 1], t[:1], encoder_hidden_states=h[row : row + 1]).sample
            unet.enable_adapters()
            assert (mixed[row] - alone[0]).abs().max() < 1e-4 * alone.abs().max()


def test_keeps_an_existing_patch_and_plain_unets_run_unplanned():
    unet = _unet(("a", 4))
    report = patch_unet(unet)
    with planned_unet(unet, ["a"], purpose="fused", error=ValueError) as call:
        assert call.report is report
    assert patch_report(unet) is report
    unpatch_unet(unet)
    with planned_unet(build_unet("tiny"), [None], purpose="sample") as call:
        assert not call.patched and call.slots([None]) == [None]


def test_refusals_name_what_to_do():
    with pytest.raises(CatfastError, match="no adapter named 'x'"):
        with planned_unet(_unet(("a", 2)), ["x"], purpose="sample"):
            pass
    unet = _unet(("a", 2))
    unet.disable_adapters()
    with pytest.raises(CatfastError, match="enable_adapters"):
        with planned_unet(unet, ["a"], purpose="sample"):
            pass
    assert patch_report(unet) is None
    unet = _unet(("a", 2))
    unet.enable_gradient_checkpointing()  # the backward recomputes blocks after the call: the patch stays
    with planned_unet(unet, ["a"], purpose="fused", error=ValueError):
        pass
    assert patch_report(unet) is not None
    unpatch_unet(unet)
    with pytest.raises(ValueError, match="purpose"):
        with planned_unet(unet, ["a"], purpose="other"):
            pass


def test_run_segmented_clears_its_plan_even_when_the_call_fails():
    unet = build_unet("tiny").requires_grad_(False)
    holder = SlotHolder()
    layer = SlotLora(unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), 2, holder)
    layer.put(1, torch.randn(3, 32), torch.randn(32, 3), 0.5)
    x, t, h = _inputs(2)
    plan = SegmentPlan(2, [Segment(1, 2, ((1, 1.0),))])
    out = run_segmented(unet, holder, plan, x, t, encoder_hidden_states=h)
    assert holder.plan is None
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=h).sample
    assert torch.equal(out[0], base[0]) and (out[1] - base[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="segment plan has 2 rows"):
        run_segmented(unet, holder, plan, x[:1], t[:1], encoder_hidden_states=h[:1])
    with pytest.raises(RuntimeError):
        run_segmented(unet, holder, plan, x, t, encoder_hidden_states=h[:, :, :3])  # a failing call
    assert holder.plan is None
    layer.remove()
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=h).sample, base)
