"""The fused flow-matching CAT step (one row-planned transformer call over [c | c- | c-]) against the reference
step (three calls, the official CAT code's), on each tiny DiT with a random-B LoRA and alpha != rank: the same
losses and LoRA gradients in fp32, fewer launching ops, no host sync, the transformer left as it was."""

import json

import pytest
import torch
from click.testing import CliRunner

from catfast.bench.launches import count_step
from catfast.cli import main
from catfast.integrations.patch import patch_report
from catfast.rows import tensor_to_device
from catfast.testing import assert_rel_close, lora_transformer
from catfast.train.flow_objective import flow_cat_loss, sample_flow_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["tiny-flux", "tiny-sd3", "tiny-qwenimage"]


def _batch(family, model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, family.latent_channels(model), 8, 8, generator=g)
    noise, sigmas = sample_flow_inputs(family, latents, generator=g)
    cond = family.example_cond(model, batch, 7, g)
    stripped = family.example_cond(model, batch, 7 if family.name != "qwenimage" else 5, g)
    if family.name == "qwenimage":  # captions of several lengths: padded and masked in the fused call
        cond["prompt_embeds_mask"][0, -2:] = 0
    return latents, noise, sigmas, cond, stripped


def _step(family, model, inputs, mode: str, layout: str = "one-call"):
    for p in model.parameters():
        p.grad = None
    out = flow_cat_loss(family, model, *inputs, cat_weight=0.7, mode=mode, layout=layout)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


@pytest.mark.parametrize("layout", ["one-call", "teacher-first"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_reference(name, layout):
    family, model, _ = lora_transformer(name)
    _trainable(model)
    inputs = _batch(family, model, 2, seed=1)
    ref, ref_grads = _step(family, model, inputs, "reference")
    fused, fused_grads = _step(family, model, inputs, "fused", layout)
    assert ref.cat > 0  # the adapter moved the stripped prediction: the CAT term is not trivially zero
    assert_rel_close(fused.loss, ref.loss, 1e-5, "loss")
    assert_rel_close(fused.cat, ref.cat, 1e-5, "cat term")
    assert sorted(fused_grads) == sorted(ref_grads) and ref_grads
    for n, g in ref_grads.items():
        assert_rel_close(fused_grads[n], g, 1e-5, n)
    assert patch_report(model) is None  # the temporary patch was undone


@pytest.mark.parametrize("layout", ["one-call", "teacher-first"])
@pytest.mark.parametrize("name", NAMES)
def test_held_prompt_groups_fused_equal_reference(name, layout):
    """Two more held groups (``preserve``: an extra CAT prompt at 0.35, a kept adapter's prompt at 1.0) ride in
    the same calls; each term, the loss and the LoRA gradients equal the reference's, and each term is the
    reference MSE of its own group (a group's rows swapped with another's would change it)."""
    family, model, _ = lora_transformer(name)
    _trainable(model)
    latents, noise, sigmas, cond, stripped = _batch(family, model, 2, seed=3)
    g = torch.Generator().manual_seed(4)
    extra = family.example_cond(model, 2, 6 if family.name == "qwenimage" else 7, g)
    kept = family.example_cond(model, 2, 7, g)
    runs = {}
    for mode, lay in (("reference", "one-call"), ("fused", layout)):
        for p in model.parameters():
            p.grad = None
        out = flow_cat_loss(family, model, latents, noise, sigmas, cond, stripped, cat_weight=0.7,
                            preserve=[(extra, 0.35), (kept, 1.0)], mode=mode, layout=lay)  # fmt: skip
        out.loss.backward()
        runs[mode] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref, ref_grads), (fused, fused_grads) = runs["reference"], runs["fused"]
    assert len(ref.preserved) == 2 and all(t > 0 for t in ref.preserved)
    assert abs(float(ref.preserved[0] - ref.preserved[1])) > 1e-3 * float(ref.preserved[1])  # distinct groups
    want = ref.ldm + 0.7 * ref.cat + 0.35 * ref.preserved[0] + ref.preserved[1]
    assert_rel_close(ref.loss.detach(), want, 1e-6, "reference loss = its terms")
    assert_rel_close(fused.loss, ref.loss, 1e-5, "loss")
    for i in range(2):
        assert_rel_close(fused.preserved[i], ref.preserved[i], 1e-5, f"group {i}")
    assert sorted(fused_grads) == sorted(ref_grads) and ref_grads
    for n, grad in ref_grads.items():
        assert_rel_close(fused_grads[n], grad, 1e-5, n)


@pytest.mark.parametrize("name", NAMES)
def test_fused_issues_fewer_launching_ops_and_no_host_sync(name):
    family, model, _ = lora_transformer(name)
    _trainable(model)
    inputs = _batch(family, model, 1, seed=2)
    counts = {}
    for mode in ("reference", "fused"):
        _step(family, model, inputs, mode)  # warm: plans and stand-ins are built once per run
        counts[mode] = count_step(lambda: _step(family, model, inputs, mode))
    assert counts["fused"].host_syncs == 0 and counts["reference"].host_syncs == 0
    # measured on tiny-flux: 511 against 1272 (0.40x); sd3 0.42x, qwenimage 0.42x
    assert counts["fused"].launch_ops < 0.5 * counts["reference"].launch_ops, counts


def test_fused_refuses_what_it_cannot_plan():
    family, model, _ = lora_transformer("tiny-flux")
    inputs = _batch(family, model, 1, seed=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        flow_cat_loss(family, model, *inputs, mode="one-call")
    with pytest.raises(ValueError, match="layout must be one of"):
        flow_cat_loss(family, model, *inputs, mode="fused", layout="two-calls")
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=2, target_modules=["attn.to_q"]), adapter_name="other")
    model.set_adapters(["default", "other"])
    with pytest.raises(ValueError, match="cannot row-plan|one adapter"):
        flow_cat_loss(family, model, *inputs, mode="fused")
    assert patch_report(model) is None


def test_cat_weight_zero_is_the_plain_step_in_both_modes():
    family, model, _ = lora_transformer("tiny-sd3")
    _trainable(model)
    inputs = _batch(family, model, 1, seed=4)
    plain = {m: flow_cat_loss(family, model, *inputs, cat_weight=0.0, mode=m).loss for m in ("reference", "fused")}
    assert torch.equal(plain["reference"], plain["fused"])


def test_bench_dit_step_reports_both_modes():
    result = CliRunner().invoke(main, ["bench", "dit-step", "--model", "tiny-sd3", "--steps", "1", "--side", "8",
                                       "--tokens", "4", "--rank", "2", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    entries = r["entries"]
    assert sorted(entries) == ["ai-toolkit", "fused", "fused:teacher-first", "plain", "reference"]
    assert entries["fused"]["launch_ops"] < entries["reference"]["launch_ops"]
    assert all(e["host_syncs"] == 0 and e["saved_bytes"] > 0 for e in entries.values())
    assert entries["fused:teacher-first"]["saved_bytes"] < entries["fused"]["saved_bytes"]
    for name in ("ai-toolkit", "fused", "fused:teacher-first"):  # all compute CAT's loss and gradients
        assert entries[name]["loss_rel_err"] < 1e-5 and entries[name]["grad_rel_err"] < 1e-5
    assert set(r["time_vs_plain"]) == set(entries) - {"plain"}
    via_train_step = CliRunner().invoke(main, ["bench", "train-step", "--model", "tiny-sd3", "--steps", "1"])
    assert via_train_step.exit_code == 0 and "plain LoRA step" in via_train_step.output, via_train_step.output
    refused = CliRunner().invoke(main, ["bench", "train-step", "--model", "tiny-sd3", "--graphs"])
    assert refused.exit_code == 2 and "fp32 eager" in refused.output
    odd = CliRunner().invoke(main, ["bench", "dit-step", "--side", "7"])
    assert odd.exit_code == 2 and "even --side" in odd.output


def test_tensor_to_device_copies_host_tensors():
    t = torch.randn(3)
    assert torch.equal(tensor_to_device(t, "cpu"), t)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU (benchmarks/gpu.sh)")
@pytest.mark.parametrize("layout", ["one-call", "teacher-first"])
def test_a_fused_dit_step_on_cuda_never_waits_for_the_device(layout):
    """torch's sync debug mode turns every host sync (a read of a device value, a pageable copy) into an error."""
    family, model, _ = lora_transformer("tiny-flux")
    model.cuda()
    _trainable(model)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, family.latent_channels(model), 8, 8, generator=g).cuda()
    cond, stripped = ({k: v.cuda() for k, v in family.example_cond(model, 1, 7, g).items()} for _ in range(2))
    for sync_mode in ("default", "error"):  # a warm-up step builds the plans and patch first
        noise, sigmas = sample_flow_inputs(family, latents, generator=g)
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            out = flow_cat_loss(family, model, latents, noise, sigmas, cond, stripped, mode="fused", layout=layout)
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_adapters_with_different_targets_share_one_plan():
    """A second adapter on 2 of the 12 Flux targets: rows [all-targets adapter, small adapter, base] in one
    row-planned call equal each row run alone with peft (a slot adds nothing where its adapter has no layer)."""
    from peft import LoraConfig

    from catfast.integrations.peft_adapters import randomize_lora_
    from catfast.integrations.row_call import planned_unet
    from catfast.rows import RowPlan

    family, model, base = lora_transformer("tiny-flux")
    model.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["attn.to_q", "ff.net.2"]), adapter_name="b")
    randomize_lora_(model, seed=9, std=0.3)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, family.latent_channels(model), 8, 8, generator=g)
    cond, sigmas, names = family.example_cond(model, 3, 7, g), torch.tensor([0.3, 0.5, 0.7]), ["default", "b", None]
    with torch.no_grad():
        with planned_unet(model, names, purpose="sample") as call:
            with call.plan_rows(RowPlan.build(call.slots(names), needs_grad=False)):
                mixed = family.predict(model, latents, sigmas, cond)
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in cond.items()}
            if name is None:
                alone = family.predict(base, latents[i : i + 1], sigmas[i : i + 1], row)
            else:
                model.set_adapter(name)
                alone = family.predict(model, latents[i : i + 1], sigmas[i : i + 1], row)
                assert not torch.allclose(alone, family.predict(base, latents[i : i + 1], sigmas[i : i + 1], row))
            assert_rel_close(mixed[i : i + 1], alone, 1e-5, f"row {i} ({name})")


def _two_adapters():
    """(family, tiny-flux with adapters "default" on every target and "b" on attn.to_q, random B; latents, cond,
    sigmas of 2 rows; the adapter names)."""
    from peft import LoraConfig

    from catfast.integrations.peft_adapters import randomize_lora_

    family, model, _ = lora_transformer("tiny-flux")
    model.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["attn.to_q"]), adapter_name="b")
    randomize_lora_(model, seed=4, std=0.3)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, family.latent_channels(model), 8, 8, generator=g)
    return family, model, latents, family.example_cond(model, 2, 7, g), torch.tensor([0.4, 0.6]), ["default", "b"]


def test_a_sampling_plan_sees_lora_weights_changed_in_place():
    """Under no_grad the stacked slot weights are kept between calls; an in-place change of a LoRA weight (a
    training step, a reload into the same tensor) must reach the next call."""
    from catfast.integrations.row_call import planned_unet
    from catfast.rows import RowPlan

    family, model, latents, cond, sigmas, names = _two_adapters()
    with torch.no_grad(), planned_unet(model, names, purpose="sample") as call:
        plan = RowPlan.build(call.slots(names), needs_grad=False)
        with call.plan_rows(plan):
            before = family.predict(model, latents, sigmas, cond)
        for name, p in model.named_parameters():
            if ".lora_B.b." in name:
                p.mul_(3.0)
        with call.plan_rows(plan):
            after = family.predict(model, latents, sigmas, cond)
    assert torch.equal(after[:1], before[:1])  # the untouched adapter's row
    model.set_adapter("b")
    with torch.no_grad():
        alone = family.predict(model, latents[1:], sigmas[1:], {k: v[1:] for k, v in cond.items()})
    assert not torch.allclose(after[1:], before[1:])
    assert_rel_close(after[1:], alone, 1e-5, "row of the changed adapter")


def test_trusted_adapter_weights_skip_the_check_until_unpatched():
    """``trust_adapter_weights`` (a server's promise that weights change only while unpatched): the kept stacks
    are used as they are, so an in-place change is NOT seen while the promise holds (what the promise buys: no
    per-call check over every slot); ``unpatch_unet`` withdraws it and the next patch sees the change."""
    from catfast.integrations.patch import patch_unet, trust_adapter_weights, unpatch_unet
    from catfast.integrations.row_call import planned_unet
    from catfast.rows import RowPlan

    family, model, latents, cond, sigmas, names = _two_adapters()

    def run():
        with torch.no_grad(), planned_unet(model, names, purpose="sample") as call:
            with call.plan_rows(RowPlan.build(call.slots(names), needs_grad=False)):
                return family.predict(model, latents, sigmas, cond)

    patch_unet(model)
    trust_adapter_weights(model)
    before = run()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B.b." in name:
                p.mul_(3.0)
    assert torch.equal(run(), before)  # promised unchanged: the kept stacks
    unpatch_unet(model)
    patch_unet(model)  # the cached stand-ins put back, without the promise
    assert not torch.allclose(run()[1:], before[1:])
    unpatch_unet(model)
