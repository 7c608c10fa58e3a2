"""Today's CAT / preservation steps (catfast.bench.contestants) against catfast's cat_loss, and the
`catfast bench train-step --against` command, on the tiny UNet."""

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler
from peft import LoraConfig

import catfast
from catfast.bench import precision as bench_precision
from catfast.bench import train_step as bench_step
from catfast.bench.contestants import CONTESTANTS, LOSS_FACTOR, check_names, make_contestant
from catfast.cli import main
from catfast.errors import CatfastError
from catfast.integrations.factory import build_unet
from catfast.integrations.patch import patch_unet, unpatch_unet
from catfast.integrations.schedulers import SCHEDULER_CONFIG
from catfast.testing import assert_rel_close, cat_batch, randomize_lora_
from catfast.train.objective import auto_mode


def _lora_unet(seed=0):
    unet = build_unet("tiny", seed=seed).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora_(unet, seed=seed + 1)  # random B: with peft's B = 0 every comparison would pass
    return unet


def _grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", CONTESTANTS)
def test_contestant_loss_and_lora_grads_equal_cat_loss(name):
    """official and ai-toolkit compute catfast's CAT loss (kohya half of it) by other routes: same loss
    terms and LoRA gradients as cat_loss's reference, the official teacher a separately built fp32 copy."""
    unet, sched, b = _lora_unet(), DDPMScheduler(**SCHEDULER_CONFIG), cat_batch(2)
    ref = catfast.cat_loss(unet, sched, **b, mode="reference")
    ref.total.backward()
    expected = _grads(unet)
    unet.zero_grad(set_to_none=True)
    built = []
    c = make_contestant(name, unet, sched, lambda: built.append(1) or build_unet("tiny", seed=0))
    assert len(built) == (name == "official") and len(c.modules) == 1 + (name == "official")
    out = c.loss(**b)
    out.total.backward()
    got = _grads(unet)
    factor = LOSS_FACTOR[name]
    assert_rel_close(factor * out.total.detach(), ref.total.detach(), 1e-5, f"{name} loss")
    assert_rel_close(out.cat.detach(), ref.cat.detach(), 1e-5, f"{name} CAT term")
    assert ref.cat > 0 and ref.ldm > 0
    for n, g in expected.items():
        assert g.abs().sum() > 0
        assert_rel_close(factor * got[n], g, 1e-4, n)
    assert unet.active_adapters() == ["default"]  # the contestant left the adapter on and at full scale
    assert all(layer.scaling["default"] == 2.0 for layer in unet.modules() if hasattr(layer, "scaling"))


def test_official_snr_weighting_equals_cat_loss_min_snr():
    """The official snr_loss (epsilon) weights like cat_loss's min-SNR-gamma; the teacher holds no graph."""
    unet, sched, b = _lora_unet(), DDPMScheduler(**SCHEDULER_CONFIG), cat_batch(2, seed=3)
    ref = catfast.cat_loss(unet, sched, **b, mode="reference", snr_gamma=5.0)
    c = make_contestant("official", unet, sched, lambda: build_unet("tiny", seed=0))
    out = c.loss(**b, snr_gamma=5.0)
    assert_rel_close(out.total.detach(), ref.total.detach(), 1e-5, "official min-SNR loss")
    assert not any(p.requires_grad for p in c.modules[1].parameters())


def test_unknown_contestant_lists_the_valid_ones():
    with pytest.raises(CatfastError, match="unknown contestant 'diffusers'; choose from official, ai-toolkit, kohya"):
        check_names(["official", "diffusers"])
    r = CliRunner().invoke(main, ["bench", "train-step", "--against", "official,nope"])
    assert r.exit_code != 0 and "choose from official, ai-toolkit, kohya" in r.output
    assert "Traceback" not in r.output


def test_auto_mode_rule():
    """auto on the CPU for a narrow UNet: fused, teacher rows first, at 1 thread, else the reference (the
    benchmark's measurement; both thread counts in test_objective); fused where only fused runs; the
    reference where fused cannot run."""
    unet = _lora_unet()
    mode, why = auto_mode(unet)
    assert mode == ("fused" if torch.get_num_threads() == 1 else "reference")
    assert "CPU" in why and "teacher rows first" in why
    assert auto_mode(unet, "cuda")[0] == "reference"  # not measured on a GPU yet
    unet.enable_gradient_checkpointing()  # fused runs it (the UNet stays patched for the backward)
    assert auto_mode(unet)[0] == ("fused" if torch.get_num_threads() == 1 else "reference")
    unet.disable_gradient_checkpointing()
    patch_unet(unet)
    assert auto_mode(unet)[0] == "fused"
    unpatch_unet(unet)
    torch.nn.Module.to(unet, torch.bfloat16)
    for n, p in unet.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    mode, why = auto_mode(unet)
    assert mode == "fused" and "bfloat16" in why


def test_auto_mode_picks_fused_on_sd15_widths_where_it_can_run():
    """On the CPU, a UNet of SD1.5 width (320 channels) runs fused, unless the fused step would refuse it."""
    from diffusers import UNet2DConditionModel

    cfg = dict(block_out_channels=(320,), layers_per_block=1, norm_num_groups=32, cross_attention_dim=32)
    unet = UNet2DConditionModel(
        **cfg, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)
    )
    unet.requires_grad_(False).add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    mode, why = auto_mode(unet, "cpu")
    assert mode == "fused" and "320-channel" in why
    assert auto_mode(unet, "cuda")[0] == "reference"  # not measured on a GPU yet
    unet.enable_gradient_checkpointing()
    assert auto_mode(unet, "cpu")[0] == "fused"
    unet.disable_gradient_checkpointing()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], lora_dropout=0.1), adapter_name="dropout")
    unet.set_adapter("dropout")
    mode, why = auto_mode(unet, "cpu")
    assert mode == "reference" and "lora_dropout=0.1" in why


def test_bf16_asked_without_support_says_so(monkeypatch):
    monkeypatch.setattr(bench_precision, "bf16_support", lambda device: (False, "this CPU lists neither"))
    with pytest.raises(CatfastError, match="bf16 asked, but this CPU lists neither"):
        bench_precision.resolve_mixed_precision("bf16", "cpu")
    assert bench_precision.resolve_mixed_precision("auto", "cpu")[0] == "no"
    monkeypatch.setattr(bench_precision, "bf16_support", lambda device: (True, "CPU flags avx512_bf16"))
    assert bench_precision.resolve_mixed_precision("bf16", "cpu")[0] == "bf16"  # asked: no timing
    # auto times both GEMMs and takes bf16 only where it is faster (the dev CPU's hidden AMX: it is not)
    monkeypatch.setattr(bench_precision, "gemm_rate", lambda dtype, device: 2e11 if dtype == torch.bfloat16 else 1e11)
    assert bench_precision.resolve_mixed_precision("auto", "cpu") == (
        "bf16",
        "bf16 autocast: CPU flags avx512_bf16; a bf16 GEMM ran at 200 GFLOP/s against fp32's 100",
    )
    monkeypatch.setattr(bench_precision, "gemm_rate", lambda dtype, device: 8e10 if dtype == torch.bfloat16 else 1.6e11)
    assert bench_precision.resolve_mixed_precision("auto", "cpu") == (
        "no",
        "fp32: CPU flags avx512_bf16, but a bf16 GEMM ran at 80 GFLOP/s against fp32's 160",
    )


def test_bench_train_step_against_all_end_to_end(monkeypatch):
    """The command on the tiny UNet, 1 step: every contestant under `against` with the fields of `modes`,
    the official second UNet in its parameter memory, parity (peak RSS: the next test)."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    args = ["bench", "train-step", "--model", "tiny", "--steps", "1", "--no-memory", "--layouts", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert list(result["against"]) == list(CONTESTANTS)
    assert list(result["modes"]) == ["reference", "fused", "fused:one-call", "fused:teacher-first"]
    for name, e in result["modes"].items():  # each layout is exact, and has wall and CPU time
        assert e["median_ms"] > 0 and e["median_cpu_ms"] > 0
        assert name == "reference" or (e["loss_rel_err"] < 1e-5 and e["grad_rel_err"] < 1e-4), name
    assert result["gemm_flops"] > 0 and result["auto"]["mode"] == auto_mode(_lora_unet())[0]
    ref = result["modes"]["reference"]
    for name, e in result["against"].items():
        assert set(e) >= set(ref) - {"loss_rel_err", "grad_rel_err"}
        assert e["median_ms"] > 0 and 0 < e["gemm_fraction"] < 1
        assert e["loss_rel_err"] < 1e-5 and e["grad_rel_err"] < 1e-4, name
        assert result["default_vs"][name] > 0
    assert result["against"]["official"]["param_bytes"] > 1.9 * ref["param_bytes"]
    assert result["against"]["kohya"]["param_bytes"] == ref["param_bytes"]


def test_peak_rss_of_one_entry_in_its_own_process():
    """The CPU peak memory: a fresh process builds the official contestant's two UNets, resets its RSS
    high-water mark and runs two steps; the peak is at least the RSS with both models loaded."""
    spec = dict(model="tiny", batch=1, rank=4, dtype="fp32", seed=0, targets=["to_q", "to_v"], precision="no")
    peak, setup = bench_step._peak_rss(spec, "official")
    assert peak >= setup > 50 * 2**20  # torch and two UNets are resident before the steps
