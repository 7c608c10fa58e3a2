"""The fused CAT pass (a row plan over the 3B rows: one UNet call, or the teacher rows first and then the 2B
adapter rows) against the reference objective, and patching: exact set of patched layers, shared parameters,
exact round trip."""

import copy
import json

import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig

import catfast
from catfast.env import has_triton
from catfast.integrations.factory import build_unet
from catfast.integrations.patch import patch_report, patch_unet, row_plan, unpatch_unet
from catfast.integrations.schedulers import SCHEDULER_CONFIG
from catfast.nn.row_lora import RowLoraLayer
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import assert_close_to_ref, assert_rel_close, cat_batch, flop_counter, randomize_lora_

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
ALL = ATTN + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LOCON = ATTN + ["conv1", "conv2", "conv", "conv_shortcut"]  # kohya LoCon: resnet 3x3, stride-2, 1x1 convs
LAYOUTS = ["one-call", "teacher-first"]


def _unet(targets, rank, alpha, seed=0):
    unet = build_unet("tiny", seed=seed).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    randomize_lora_(unet, seed=seed + 1)
    return unet


def _two_adapter_unet(targets):
    """``_unet`` with a second adapter "other" (rank 2), both active, every B random."""
    unet = _unet(targets, 4, 4.0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4.0, target_modules=targets), adapter_name="other")
    unet.set_adapter(["default", "other"])
    randomize_lora_(unet, seed=7)
    return unet


class _DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a device value to the host (a synchronisation on a GPU)."""

    READS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "masked_select", "equal"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _scheduler(kind="epsilon"):
    return DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": kind})


def _run(unet, sched, batch, mode, **kw):
    unet.zero_grad(set_to_none=True)
    out = catfast.cat_loss(unet, sched, **batch, mode=mode, **kw)
    out.total.backward()
    return out, {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("targets", "rank", "alpha"),
    [(ATTN, 1, 1.0), (ALL, 4, 8.0), (["attn2.to_k", "proj_in", "ff.net.2"], 64, 16.0), (LOCON, 4, 8.0)],
    ids=["attn-r1", "all-r4", "cross-proj-ff-r64", "locon-r4"],
)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_equals_reference(targets, rank, alpha, batch, kind, layout, monkeypatch):
    # the whole matrix on the torch backend; the Triton kernels (CPU interpreter, ~10 s per UNet step
    # here) on one case below and against the reference op in tests/kernels
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _unet(targets, rank, alpha)
    sched, b = _scheduler(kind), cat_batch(batch)
    ref, ref_grads = _run(unet, sched, b, "reference", snr_gamma=5.0 if kind == "v_prediction" else None)
    fused, grads = _run(unet, sched, b, "fused", snr_gamma=5.0 if kind == "v_prediction" else None, layout=layout)
    for term in ("total", "ldm", "cat"):
        assert_rel_close(getattr(fused, term).detach(), getattr(ref, term).detach(), 1e-5, term)
    assert ref.cat.item() > 0 and grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0
        assert_rel_close(grads[name], g, 1e-4, name)
    assert patch_report(unet) is None  # fused mode left the UNet as it found it


@pytest.mark.skipif(not has_triton().available, reason=f"triton unavailable: {has_triton().detail}")
def test_fused_equals_reference_with_triton_kernels(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "triton")
    unet = _unet(ALL, 8, 4.0)
    sched, b = _scheduler(), cat_batch(2)
    ref, ref_grads = _run(unet, sched, b, "reference")
    fused, grads = _run(unet, sched, b, "fused", layout="one-call")  # the layout fused_layout picks on a GPU
    for term in ("total", "ldm", "cat"):
        assert_rel_close(getattr(fused, term).detach(), getattr(ref, term).detach(), 1e-5, term)
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, 1e-4, name)


@pytest.mark.parametrize(("layout", "rows"), [("one-call", [6]), ("teacher-first", [2, 4])])
def test_unet_calls_of_each_layout(layout, rows):
    unet = _unet(ATTN, 4, 4.0)
    calls = []
    handle = unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        catfast.cat_loss(unet, _scheduler(), **cat_batch(2), mode="fused", layout=layout)
    finally:
        handle.remove()
    assert calls == rows


class _BackwardRows(torch.utils._python_dispatch.TorchDispatchMode):
    """The batch (N) of every GroupNorm and SiLU backward: the ops between the row-aware ones."""

    def __init__(self):
        super().__init__()
        self.rows: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "native_group_norm_backward":
            self.rows.add(args[5])
        elif name == "silu_backward" and args[0].dim() == 4:  # the resnets' feature maps, not the time embedding
            self.rows.add(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_first_gradients_are_compact(layout, monkeypatch):
    """Teacher rows first: no teacher row reaches backward (the norms and activations between the row-aware
    ops run their backward over the 2B adapter rows only), and the loss and LoRA gradients (B random) are the
    reference's. The one-call layout runs those backwards over all 3B rows, zeros in the teacher's."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _unet(ALL, 4, 4.0)
    sched, b = _scheduler(), cat_batch(2)
    ref, ref_grads = _run(unet, sched, b, "reference")
    unet.zero_grad(set_to_none=True)
    out = catfast.cat_loss(unet, sched, **b, mode="fused", layout=layout)
    with _BackwardRows() as seen:
        out.total.backward()
    assert seen.rows == ({4} if layout == "teacher-first" else {6})
    for term in ("total", "ldm", "cat"):
        assert_rel_close(getattr(out, term).detach(), getattr(ref, term).detach(), 1e-5, term)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0
        assert_rel_close(unet.get_parameter(name).grad, g, 1e-4, name)


def test_layout_rule_and_bad_layout():
    from diffusers import UNet2DConditionModel

    from catfast.train.objective import fused_layout

    unet = _unet(ATTN, 2, 2.0)
    assert fused_layout(unet)[0] == "teacher-first" and "32-channel" in fused_layout(unet)[1]
    assert fused_layout(unet, "cuda")[0] == "one-call"
    wide = UNet2DConditionModel(block_out_channels=(320,), layers_per_block=1, norm_num_groups=32,
                                cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",))  # fmt: skip
    assert fused_layout(wide, "cpu")[0] == "one-call"
    with pytest.raises(ValueError, match="layout must be one of"):
        catfast.cat_loss(unet, _scheduler(), **cat_batch(1), mode="fused", layout="two-calls")


def test_patch_is_exact_shares_parameters_and_unpatches_exactly():
    unet = _unet(ALL, 4, 8.0)
    before_params = dict(unet.named_parameters())
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    peft_names = sorted(n for n, m in unet.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    x = cat_batch(2)
    with torch.no_grad():
        want = unet(x["latents"], x["timesteps"], x["cond"]).sample

    report = patch_unet(unet)
    assert sorted(report.patched) == peft_names and report.skipped == {} and report.slots == ["default"]
    assert all(isinstance(unet.get_submodule(n), RowLoraLayer) for n in peft_names)
    after = dict(unet.named_parameters())
    assert after.keys() == before_params.keys() and all(after[k] is before_params[k] for k in after)
    with torch.no_grad():  # no plan: defers to peft exactly
        assert torch.equal(unet(x["latents"], x["timesteps"], x["cond"]).sample, want)
        with row_plan(unet, RowPlan.build([NO_ADAPTER, 0], [1.0, 1.0], False)):
            mixed = unet(x["latents"], x["timesteps"], x["cond"]).sample
    unet.disable_adapters()
    with torch.no_grad():  # the no-adapter row is the base model, the adapter row the peft model
        base = copy.deepcopy(unet)
        unpatch_unet(base)
        base.disable_adapters()
        assert_rel_close(mixed[0], base(x["latents"], x["timesteps"], x["cond"]).sample[0], 1e-5, "base row")
    unet.enable_adapters()
    assert_rel_close(mixed[1], want[1], 1e-5, "adapter row")

    undone = unpatch_unet(unet)
    assert undone.patched == report.patched and patch_report(unet) is None
    assert all(not isinstance(m, RowLoraLayer) for m in unet.modules())
    state = unet.state_dict()
    assert state.keys() == before_state.keys() and all(torch.equal(state[k], before_state[k]) for k in state)


def test_patch_is_put_back_from_cache_only_while_the_unet_is_unchanged(monkeypatch):
    """cat_loss(mode="fused") on an unpatched UNet patches and unpatches every call: the second patch puts the
    same stand-ins back, re-reading each LoRA layer's scaling; a module replaced meanwhile rebuilds the patch."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _unet(ATTN, 4, 4.0)
    first = patch_unet(unet)
    stand_ins = {name: unet.get_submodule(name) for name in first.patched + first.frozen}
    unpatch_unet(unet)
    assert patch_unet(unet) is first and all(unet.get_submodule(n) is m for n, m in stand_ins.items())
    unpatch_unet(unet)
    sched, b = _scheduler(), cat_batch(2)
    for layer in unet.modules():  # what diffusers' set_adapters(weights=...) does to each peft layer
        if hasattr(layer, "scaling") and "default" in getattr(layer, "scaling", {}):
            layer.scaling["default"] *= 0.5
    ref, ref_grads = _run(unet, sched, b, "reference")
    fused, grads = _run(unet, sched, b, "fused", layout="one-call")
    assert_rel_close(fused.total.detach(), ref.total.detach(), 1e-5, "total after a scaling change")
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, 1e-4, name)
    name = first.frozen[0]
    parent, _, child = name.rpartition(".")
    replaced = copy.deepcopy(unet.get_submodule(name))
    setattr(unet.get_submodule(parent), child, replaced)
    second = patch_unet(unet)
    assert second is not first and unet.get_submodule(name).inner is replaced
    unpatch_unet(unet)
    assert unet.get_submodule(name) is replaced and patch_report(unet) is None


def test_locon_layers_are_row_planned_and_lora_bias_is_skipped_with_a_reason():
    unet = build_unet("tiny").requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LOCON))
    report = patch_unet(unet)
    kernels = {unet.get_submodule(name).kernel for name in report.patched}
    assert report.skipped == {} and (3, 3) in kernels and (1, 1) in kernels
    unpatch_unet(unet)
    biased = build_unet("tiny").requires_grad_(False)
    biased.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], lora_bias=True))
    report = patch_unet(biased)
    assert not report.patched and report.skipped and all("lora_bias" in why for why in report.skipped.values())
    unpatch_unet(biased)
    with pytest.raises(ValueError, match="cannot row-plan .* use mode='reference'"):
        catfast.cat_loss(biased, _scheduler(), **cat_batch(1), mode="fused")
    assert patch_report(biased) is None


def test_bad_input_fails_before_any_kernel():
    unet = _unet(ATTN, 4, 4.0)
    b = cat_batch(2)
    with pytest.raises(ValueError, match="needs a patched UNet"):
        with row_plan(unet, RowPlan.build([0, 0])):
            pass
    patch_unet(unet)
    with pytest.raises(ValueError, match="row plan has 3 rows but the batch has 2"):
        with row_plan(unet, RowPlan.build([0, 0, 0])):
            unet(b["latents"], b["timesteps"], b["cond"])
    with pytest.raises(ValueError, match="slot 1 but the layer has 1 slot"):
        with row_plan(unet, RowPlan.build([0, 1])):
            unet(b["latents"], b["timesteps"], b["cond"])
    with pytest.raises(ValueError, match="unpatch_unet"):
        catfast.cat_loss(unet, _scheduler(), **b, mode="reference")
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        patch_unet(unet, ["other"])
    unpatch_unet(unet)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        patch_unet(build_unet("tiny"))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_wasted_teacher_work(batch, layout, monkeypatch):
    """Forward FLOPs <= the reference's, backward FLOPs <= 1.02x; bytes saved for backward <= the reference's
    teacher-first, and one-call at most the 3B rows' share of them (1.5x: the norms and activations between the
    row-aware layers save the teacher rows too; docs/design.md, "What a step issues")."""
    from contextlib import nullcontext

    from catfast.bench.train_step import _measure_once, _setup

    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet, sched, args, _ = _setup("tiny", batch, 4, torch.float32, "cpu", seed=batch)
    ref = _measure_once(unet, lambda: catfast.cat_loss(unet, sched, **args, mode="reference"), nullcontext)
    fused = _measure_once(unet, lambda: catfast.cat_loss(unet, sched, **args, mode="fused", layout=layout), nullcontext)
    assert fused["fwd_flops"] < ref["fwd_flops"]  # the shared prefix (conv_in, time embedding, ...) ran once
    assert fused["bwd_flops"] <= 1.02 * ref["bwd_flops"]
    assert fused["saved_bytes"] <= (1.5 if layout == "one-call" else 1.0) * ref["saved_bytes"]
    assert ref["saved_bytes"] > 0 and ref["bwd_flops"] > 0
    for name, g in ref["grads"].items():
        assert_rel_close(fused["grads"][name], g, 1e-4, name)


def test_patch_report_lists_frozen_layers_and_attention():
    unet = _unet(ATTN, 2, 2.0)
    report = patch_unet(unet)
    convs = {n for n, m in build_unet("tiny").named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    lora = {n.rsplit(".", 1)[0] if n.endswith(".base_layer") else n for n in report.patched}
    assert set(report.frozen) == convs - lora
    assert report.attention == sorted(unet.attn_processors)
    unpatch_unet(unet)
    assert not any(type(p).__name__ == "RowAttnProcessor" for p in unet.attn_processors.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_with_sdxl_added_conditions(layout, monkeypatch):
    """SDXL's pooled text embeddings reach the prefix (time embedding): no prefix sharing there, and
    the fused pass still equals the reference."""
    from diffusers import UNet2DConditionModel

    from catfast.integrations.factory import unet_config

    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    cfg = unet_config("tiny")
    cfg.update(addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=16 + 6 * 8)  # fmt: skip
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=ATTN))
    randomize_lora_(unet)
    b = cat_batch(2)
    g = torch.Generator().manual_seed(3)
    for key in ("cond", "cond_stripped"):
        extra = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.rand(2, 6, generator=g)}
        b[key] = {"encoder_hidden_states": b[key], "added_cond_kwargs": extra}
    ref, ref_grads = _run(unet, _scheduler(), b, "reference")
    fused, grads = _run(unet, _scheduler(), b, "fused", layout=layout)
    for term in ("total", "ldm", "cat"):
        assert_rel_close(getattr(fused, term).detach(), getattr(ref, term).detach(), 1e-5, term)
    for name, g_ref in ref_grads.items():
        assert_rel_close(grads[name], g_ref, 1e-4, name)


def test_several_adapters_of_different_ranks_in_one_call():
    """Rows on adapter "a" (rank 2), adapter "b" (rank 4, alpha 1) and the base, in one call, equal peft
    running each adapter alone (multi-concept rows / a teacher made of base + frozen adapters)."""
    unet = build_unet("tiny").requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=ALL), adapter_name="a")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=1, target_modules=ALL), adapter_name="b")
    randomize_lora_(unet, seed=5)
    x = cat_batch(3)
    want = []
    with torch.no_grad():
        for name in ("a", "b", None):
            if name is None:
                unet.disable_adapters()
            else:
                unet.set_adapter(name)
            want.append(unet(x["latents"], x["timesteps"], x["cond"]).sample)
        unet.enable_adapters()
        report = patch_unet(unet, ["a", "b"])
        with row_plan(unet, RowPlan.build([0, 1, NO_ADAPTER], [1.0, 1.0, 0.0], False)), _DeviceReads() as mode:
            got = unet(x["latents"], x["timesteps"], x["cond"]).sample
    unpatch_unet(unet)
    assert report.slots == ["a", "b"] and not report.skipped
    assert mode.reads == []  # serving-style mixed rows: no device synchronisation either
    for i in range(3):
        assert_rel_close(got[i], want[i][i], 1e-5, f"row {i}")
    assert (want[0][0] - want[1][0]).abs().max() > 1e-3  # the two adapters really differ


@pytest.mark.parametrize("layout", LAYOUTS)
def test_samples_on_different_adapters_equal_reference(layout, monkeypatch):
    """Multi-concept: each sample's rows on its own adapter (fused: one call; reference: one per adapter)."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _two_adapter_unet(ATTN)
    sched, b = _scheduler(), cat_batch(3)
    adapters = ["other", "default", "other"]
    ref, ref_grads = _run(unet, sched, b, "reference", adapters=adapters)
    assert unet.active_adapters() == ["default", "other"]  # restored, with both trainable again
    fused, grads = _run(unet, sched, b, "fused", adapters=adapters, layout=layout)
    for term in ("total", "ldm", "cat"):
        assert_rel_close(getattr(fused, term).detach(), getattr(ref, term).detach(), 1e-5, term)
    assert any("other" in n for n in ref_grads) and any("default" in n for n in ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0
        assert_rel_close(grads[name], g, 1e-4, name)
    # each sample really uses its own adapter: swapping the assignment changes the loss
    swapped, _ = _run(unet, sched, b, "fused", adapters=["default", "other", "default"], layout=layout)
    assert abs(swapped.total.item() - fused.total.item()) > 1e-6
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        catfast.cat_loss(unet, sched, **b, mode="fused", adapters=["nope"] * 3)
    with pytest.raises(ValueError, match="names 2 samples"):
        catfast.cat_loss(unet, sched, **b, mode="fused", adapters=["other"] * 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_step_never_reads_the_device(layout, monkeypatch):
    """Which samples go where is decided on the host from the plan's Python values: no layer may read a
    device tensor to find out (each read syncs a GPU; 894 per small-UNet step before RowPlan.layout)."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _two_adapter_unet(LOCON)
    sched, b = _scheduler(), cat_batch(3)
    patch_unet(unet)
    try:
        _run(unet, sched, b, "fused", adapters=["other", "default", "other"], layout=layout)  # warm-up
        tolist = torch.Tensor.tolist
        with _DeviceReads() as mode:
            monkeypatch.setattr(torch.Tensor, "tolist", lambda t: mode.reads.append("tolist") or tolist(t))
            _, grads = _run(unet, sched, b, "fused", adapters=["other", "default", "other"], layout=layout)
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    finally:
        unpatch_unet(unet)
    assert mode.reads == []
    assert any("other" in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize(("cat_weight", "layout"), [(0.0, "auto"), (1.0, "one-call"), (1.0, "teacher-first")])
def test_fused_under_distributed_data_parallel(tmp_path, cat_weight, layout, monkeypatch):
    """A DDP-wrapped UNet (gloo, one process): the wrapper runs the forward, results are unchanged."""
    import torch.distributed as dist

    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _unet(ATTN, 4, 4.0)
    sched, b = _scheduler(), cat_batch(2)
    plain, plain_grads = _run(unet, sched, b, "fused", cat_weight=cat_weight, layout=layout)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(unet)
        ddp, ddp_grads = _run(wrapped, sched, b, "fused", cat_weight=cat_weight, layout=layout)
    finally:
        dist.destroy_process_group()
    assert_rel_close(ddp.total.detach(), plain.total.detach(), 1e-6, "total")
    for name, g in plain_grads.items():
        assert_rel_close(ddp_grads["module." + name], g, 1e-6, name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_lora_on_bf16_unet(layout, monkeypatch):
    """Mixed precision as peft's cast_training_params leaves it: frozen UNet in bf16, LoRA in fp32. The
    fused step runs the LoRA branch in bf16, as the reference does under autocast (the diffusers/accelerate
    training scripts); its error against fp32 math on the same bf16-rounded weights is within that one's."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _unet(ATTN, 4, 4.0).to(torch.bfloat16)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    exact = copy.deepcopy(unet).float()
    sched, b = _scheduler(), cat_batch(2)
    exact_out, exact_grads = _run(exact, sched, b, "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = _run(unet, sched, b, "reference")
    fused, grads = _run(unet, sched, b, "fused", layout=layout)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert_close_to_ref(fused.total.detach(), exact_out.total.detach(), ref.total.detach(), "total")

    def flat(gs):
        return torch.cat([gs[name].double().flatten() for name in exact_grads])

    # over all 64 LoRA tensors: per tensor the max-error ratio scatters with bf16 rounding order (median
    # 1.09, max 2.7 measured here), so the rule is applied to the whole gradient's L2 error
    err, ref_err = (flat(grads) - flat(exact_grads)).norm(), (flat(ref_grads) - flat(exact_grads)).norm()
    assert 0 < err <= 2 * ref_err, (err, ref_err)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_with_gradient_checkpointing(layout, monkeypatch):
    """Checkpointed blocks recompute during backward, after the row plan is unset: they must replay it. The
    user patches nothing: the fused step leaves the UNet patched for its backward."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _unet(ALL, 4, 4.0)
    sched, b = _scheduler(), cat_batch(2)
    ref, ref_grads = _run(unet, sched, b, "reference")
    unet.enable_gradient_checkpointing()
    fused, grads = _run(unet, sched, b, "fused", layout=layout)
    assert patch_report(unet) is not None
    unpatch_unet(unet)
    assert_rel_close(fused.total.detach(), ref.total.detach(), 1e-5, "total")
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, 1e-4, name)


def test_twin_groups_share_work_until_the_first_cross_attention(monkeypatch):
    """The adapter rows on both captions are computed once until the first cross-attention: same output
    and LoRA gradients as computing them apart, fewer forward and backward FLOPs."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = _unet(ALL, 4, 4.0)
    patch_unet(unet)
    b = cat_batch(2)
    # the fused CAT layout: [trigger | stripped] on slot 0 with grad, then the teacher rows without grad
    plan = RowPlan.build([0] * 4 + [NO_ADAPTER] * 2, [1.0] * 4 + [0.0] * 2, [True] * 4 + [False] * 2)
    cond = torch.cat([b["cond"], b["cond_stripped"], b["cond_stripped"]])
    results = {}
    for twins in (False, True):
        unet.zero_grad(set_to_none=True)
        with flop_counter() as fwd, row_plan(unet, plan, identical_groups=3, twin_groups=twins):
            out = unet(
                torch.cat([b["latents"]] * 3), torch.cat([b["timesteps"]] * 3), encoder_hidden_states=cond
            ).sample
        with flop_counter() as bwd:
            out[:4].square().mean().backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
        results[twins] = out.detach(), grads, fwd.get_total_flops(), bwd.get_total_flops()
    unpatch_unet(unet)
    (out, grads, fwd, bwd), (out_t, grads_t, fwd_t, bwd_t) = results[False], results[True]
    assert_rel_close(out_t, out, 1e-6, "output")
    for name, g in grads.items():
        assert g.abs().sum() > 0
        assert_rel_close(grads_t[name], g, 1e-5, name)
    assert fwd_t < fwd and bwd_t < bwd
    patch_unet(unet)
    with pytest.raises(ValueError, match="groups 0 and 1 of the row plan differ"):
        with row_plan(unet, RowPlan.build([0, NO_ADAPTER, NO_ADAPTER]), identical_groups=3, twin_groups=True):
            pass
    with row_plan(unet, plan, identical_groups=3):  # the failed call left no plan behind
        pass
    unpatch_unet(unet)


def test_bench_train_step_command_reports_both_modes_with_locon_targets(monkeypatch):
    """`catfast bench train-step` end to end on the tiny UNet, LoCon targets included: one JSON object with
    both modes' time, FLOPs (attention counted) and saved bytes, and the parity of the two modes."""
    from click.testing import CliRunner

    from catfast.cli import main

    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    targets = "to_q,to_k,to_v,to_out.0,conv1,conv"
    args = ["bench", "train-step", "--model", "tiny", "--steps", "1", "--targets", targets, "--against", ""]
    args += ["--no-memory", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["targets"] == targets.split(",") and result["model"] == "tiny"
    ref, fused = result["modes"]["reference"], result["modes"]["fused"]
    assert ref["median_ms"] > 0 and fused["median_ms"] > 0
    # the FLOP count runs after one uncounted step: the convolution algorithms timed on a shape's first call
    # would otherwise add their runs to the fused step's FLOPs
    assert fused["fwd_flops"] < ref["fwd_flops"] and fused["bwd_flops"] <= 1.02 * ref["bwd_flops"]
    assert result["conv_gemm"]["timed"] > 0 and 0 <= result["conv_gemm"]["gemm"] <= result["conv_gemm"]["timed"]
    assert result["parity"]["loss_rel_err"] < 1e-5 and result["parity"]["grad_rel_err"] < 1e-4


def test_flop_counter_counts_cpu_attention():
    """torch has no FLOP formula for the CPU flash-attention kernels; catfast's counter adds torch's SDPA ones."""
    q, k, v = (torch.randn(2, 4, 64, 8, requires_grad=True) for _ in range(3))
    with flop_counter() as fwd:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with flop_counter() as bwd:
        out.sum().backward()
    assert fwd.get_total_flops() == 2 * (2 * 2 * 4 * 64 * 64 * 8)  # QK^T and PV, 2 FLOPs per multiply-add
    assert bwd.get_total_flops() > fwd.get_total_flops()
