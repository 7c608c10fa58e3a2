"""The reference CAT objective against independent hand computations on the tiny UNet."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

import catfast
from catfast.integrations.factory import build_unet, unet_config
from catfast.integrations.schedulers import SCHEDULER_CONFIG
from catfast.testing import assert_rel_close, randomize_lora_

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _scheduler(prediction_type="epsilon"):
    return DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})


def _lora_unet(unet, rank=4, alpha=8.0, seed=1):
    """Attach a LoRA with alpha != rank and random B. Returns (lora_unet, untouched base copy)."""
    base = copy.deepcopy(unet).requires_grad_(False)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=True))
    randomize_lora_(unet, seed=seed)
    return unet, base


def _batch(batch=2, seed=0, ctx_dim=32, tokens=7):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, 4, 16, 16, generator=g)
    eps = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    c = torch.randn(batch, tokens, ctx_dim, generator=g)
    c_minus = torch.randn(batch, tokens, ctx_dim, generator=g)
    return dict(latents=z0, noise=eps, timesteps=t, cond=c, cond_stripped=c_minus)


def _lora_grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.fixture
def tiny():
    return _lora_unet(build_unet("tiny", seed=0))


def _abar(sched, t):
    return sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_matches_independent_hand_computation(tiny, prediction_type, snr_gamma):
    """Every term against a computation from first principles: add_noise, v and min-SNR by formula,
    the teacher from a separate copy of the base UNet that never had an adapter."""
    unet, base = tiny
    sched = _scheduler(prediction_type)
    b = _batch()
    out = catfast.cat_loss(unet, sched, **b, cat_weight=0.7, mode="reference", snr_gamma=snr_gamma)

    abar = _abar(sched, b["timesteps"])
    z_t = abar.sqrt() * b["latents"] + (1 - abar).sqrt() * b["noise"]
    target = b["noise"] if prediction_type == "epsilon" else abar.sqrt() * b["noise"] - (1 - abar).sqrt() * b["latents"]
    with torch.no_grad():
        teacher = base(z_t, b["timesteps"], encoder_hidden_states=b["cond_stripped"]).sample
        pred = unet(z_t, b["timesteps"], encoder_hidden_states=b["cond"]).sample
        pred_minus = unet(z_t, b["timesteps"], encoder_hidden_states=b["cond_stripped"]).sample
    a = abar.flatten().double()
    snr = a / (1 - a)
    if snr_gamma is None:
        w = torch.ones_like(snr)
    else:
        w = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / (snr if prediction_type == "epsilon" else snr + 1)
    ldm = (((pred - target) ** 2).flatten(1).mean(1).double() * w).mean()
    cat = (((pred_minus - teacher) ** 2).flatten(1).mean(1).double() * w).mean()
    assert_rel_close(out.ldm.detach(), ldm, 1e-5, "ldm")
    assert_rel_close(out.cat.detach(), cat, 1e-5, "cat")
    assert_rel_close(out.total.detach(), ldm + 0.7 * cat, 1e-5, "total")
    assert out.cat.item() > 0  # random B: the adapter really moves the stripped prediction


def test_cat_weight_zero_is_plain_lora_loss_and_grads(tiny):
    unet, _ = tiny
    sched = _scheduler()
    b = _batch()
    out = catfast.cat_loss(unet, sched, **b, cat_weight=0.0)
    out.total.backward()
    got = _lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    z_t = sched.add_noise(b["latents"], b["noise"], b["timesteps"])
    plain = F.mse_loss(unet(z_t, b["timesteps"], encoder_hidden_states=b["cond"]).sample, b["noise"])
    plain.backward()
    want = _lora_grads(unet)
    assert_rel_close(out.total.detach(), plain.detach(), 1e-6, "loss")
    assert out.total is out.ldm
    for name in want:
        assert_rel_close(got[name], want[name], 1e-5, name)


def test_gradients_match_three_separate_passes(tiny):
    """The batched adapter pass and no_grad teacher give the gradients of the naive 3-call loss."""
    unet, base = tiny
    sched = _scheduler()
    b = _batch(batch=3, seed=4)
    out = catfast.cat_loss(unet, sched, **b, cat_weight=1.0)
    out.total.backward()
    got = _lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    z_t = sched.add_noise(b["latents"], b["noise"], b["timesteps"])
    teacher = base(z_t, b["timesteps"], encoder_hidden_states=b["cond_stripped"]).sample
    loss = F.mse_loss(unet(z_t, b["timesteps"], encoder_hidden_states=b["cond"]).sample, b["noise"]) + F.mse_loss(
        unet(z_t, b["timesteps"], encoder_hidden_states=b["cond_stripped"]).sample, teacher
    )
    loss.backward()
    for name, g in _lora_grads(unet).items():
        assert_rel_close(got[name], g, 1e-4, name)


def test_only_lora_parameters_receive_gradients(tiny):
    unet, _ = tiny
    for p in unet.parameters():  # even if the user forgot to freeze the base, the teacher adds no grad
        p.grad = None
    catfast.cat_loss(unet, _scheduler(), **_batch(), cat_weight=1.0).total.backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    lora = {n for n, _ in unet.named_parameters() if "lora_" in n}
    assert with_grad == lora and len(lora) > 0
    assert all(unet.get_parameter(n).grad.abs().sum() > 0 for n in lora)


def test_base_pass_is_no_grad_with_adapter_disabled(tiny):
    unet, base = tiny
    calls = []

    def hook(module, args, kwargs, output):
        lora_layers = [m for m in module.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
        calls.append(
            dict(
                rows=args[0].shape[0],
                grad_enabled=torch.is_grad_enabled(),
                requires_grad=output.sample.requires_grad,
                disabled=all(m.disable_adapters for m in lora_layers),
                out=output.sample.detach(),
            )
        )

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    b = _batch()
    try:
        catfast.cat_loss(unet, _scheduler(), **b, cat_weight=1.0, mode="reference")
    finally:
        handle.remove()
    assert [c["rows"] for c in calls] == [2, 4]  # teacher on B rows, then both adapter passes batched
    teacher, student = calls
    assert not teacher["grad_enabled"] and not teacher["requires_grad"] and teacher["disabled"]
    assert student["requires_grad"] and not student["disabled"]
    z_t = _scheduler().add_noise(b["latents"], b["noise"], b["timesteps"])
    with torch.no_grad():
        want = base(z_t, b["timesteps"], encoder_hidden_states=b["cond_stripped"]).sample
    assert_rel_close(teacher["out"], want, 1e-5, "teacher")
    # the adapter is active again afterwards
    assert not any(m.disable_adapters for m in unet.modules() if hasattr(m, "lora_A"))


def test_sdxl_style_added_conditions():
    cfg = unet_config("tiny")
    cfg.update(
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8
    )
    torch.manual_seed(0)
    unet, base = _lora_unet(UNet2DConditionModel(**cfg))
    b = _batch()
    g = torch.Generator().manual_seed(9)

    def cond(hidden):
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, 16, generator=g),
                "time_ids": torch.rand(2, 6, generator=g),
            },
        }

    c, c_minus = cond(b.pop("cond")), cond(b.pop("cond_stripped"))
    sched = _scheduler()
    out = catfast.cat_loss(unet, sched, **b, cond=c, cond_stripped=c_minus, cat_weight=1.0)
    z_t = sched.add_noise(b["latents"], b["noise"], b["timesteps"])
    with torch.no_grad():
        teacher = base(z_t, b["timesteps"], **c_minus).sample
        pred_minus = unet(z_t, b["timesteps"], **c_minus).sample
    assert_rel_close(out.cat.detach(), F.mse_loss(pred_minus, teacher), 1e-5, "cat")


def test_bad_input_is_refused_before_any_pass(tiny):
    unet, base = tiny
    sched = _scheduler()
    b = _batch()
    with pytest.raises(ValueError, match="mode"):
        catfast.cat_loss(unet, sched, **b, mode="fast")
    with pytest.raises(ValueError, match="LoRA adapter"):
        catfast.cat_loss(base, sched, **b)
    with pytest.raises(ValueError, match="cond_stripped has batch 1"):
        catfast.cat_loss(unet, sched, **{**b, "cond_stripped": b["cond_stripped"][:1]})
    with pytest.raises(ValueError, match="timesteps"):
        catfast.cat_loss(unet, sched, **{**b, "timesteps": b["timesteps"][:1]})
    with pytest.raises(ValueError, match="cat_weight"):
        catfast.cat_loss(unet, sched, **b, cat_weight=-1.0)
    with pytest.raises(ValueError, match="prediction_type"):
        catfast.cat_loss(unet, _scheduler("sample"), **b)


def test_default_mode_auto_runs_the_rule_s_choice(tiny):
    """cat_loss's default mode "auto" gives the reference's numbers on a plain UNet (the CPU rule: fused, teacher
    rows first) and runs the fused step on a patched one (where the reference refuses)."""
    from catfast.integrations.patch import patch_unet, unpatch_unet

    unet, _ = tiny
    sched, b = _scheduler(), _batch(seed=4)
    ref = catfast.cat_loss(unet, sched, **b, mode="reference").total
    assert_rel_close(catfast.cat_loss(unet, sched, **b).total.detach(), ref.detach(), 1e-5, "auto on a plain UNet")
    patch_unet(unet)
    with pytest.raises(ValueError, match="needs the plain peft UNet"):
        catfast.cat_loss(unet, sched, **b, mode="reference")
    assert_rel_close(catfast.cat_loss(unet, sched, **b).total.detach(), ref.detach(), 1e-5, "auto on a patched UNet")
    unpatch_unet(unet)


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_auto_rule_on_the_cpu_follows_width_and_threads(tiny, threads):
    """The measured CPU rule: a narrow UNet runs fused (teacher rows first) at 1 thread and the reference at
    more; an SD1.5-width one runs fused at any thread count."""
    from catfast.train.objective import auto_mode

    unet, _ = tiny
    threads(1)
    assert auto_mode(unet) == (
        "fused",
        "on the CPU at 1 thread the fused step, teacher rows first, is faster for a 32-channel UNet "
        "(1.00-1.18x the reference's speed)",
    )
    threads(2)
    mode, why = auto_mode(unet)
    assert mode == "reference" and why.startswith("on the CPU at 2 threads the reference is faster")
    wide = _lora_unet(UNet2DConditionModel(**{**unet_config("tiny"), "block_out_channels": (320, 320)}))[0]
    for n in (1, 2):
        threads(n)
        assert auto_mode(wide)[0] == "fused" and "320-channel" in auto_mode(wide)[1]
