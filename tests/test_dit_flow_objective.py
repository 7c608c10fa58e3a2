"""The flow-matching CAT objective (reference mode) against hand computations with diffusers' modules:
the LoRA is applied by hand as merged weights W + scale * B A in a functional call of an untouched copy of
the transformer, packing and ids come from diffusers' FluxPipeline / QwenImagePipeline, and the timestep
sampler is checked against diffusers' compute_density_for_timestep_sampling and FlowMatchEulerDiscreteScheduler."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from catfast.integrations.families import FAMILIES, lora_disabled
from catfast.testing import assert_rel_close, lora_transformer
from catfast.train.flow_objective import flow_cat_loss, sample_flow_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 3, 5.0  # scale 5/3: alpha != rank


def _lora_model(name: str):
    """(family, transformer with a random-B LoRA on the family's targets, untouched copy of the base)."""
    return lora_transformer(name, rank=RANK, alpha=ALPHA)


def _conds(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    width = model.config.joint_attention_dim
    pooled = getattr(model.config, "pooled_projection_dim", None)

    def one():
        embeds = torch.randn(batch, 7, width, generator=g)
        if pooled is None:  # Qwen-Image: a text mask (the last two tokens of sample 0 are padding)
            mask = torch.ones(batch, 7, dtype=torch.long)
            mask[0, -2:] = 0
            return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": torch.randn(batch, pooled, generator=g)}

    return one(), one()


def _lora_params(model):
    """{module name: (A, B)} of the peft LoRA layers."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return out


def _hand_call(name, base, weights, latents, sigmas, cond):
    """The transformer's prediction with ``weights`` swapped in, the inputs built as diffusers' training
    scripts build them (FluxPipeline's packing and ids, guidance 3.5; SD3: timestep 1000 sigma; Qwen-Image:
    QwenImagePipeline's packing, img_shapes and text mask)."""
    b, c, h, w = latents.shape
    if name == "tiny-qwenimage":
        out = torch.func.functional_call(
            base,
            weights,
            (),
            dict(
                hidden_states=QwenImagePipeline._pack_latents(latents, b, c, h, w),
                encoder_hidden_states=cond["prompt_embeds"],
                encoder_hidden_states_mask=cond["prompt_embeds_mask"],
                timestep=sigmas,
                img_shapes=[[(1, h // 2, w // 2)]] * b,
                return_dict=False,
            ),
        )[0]
        return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8).reshape(b, c, h, w)
    if name == "tiny-flux":
        out = torch.func.functional_call(
            base,
            weights,
            (),
            dict(
                hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w),
                encoder_hidden_states=cond["prompt_embeds"],
                pooled_projections=cond["pooled_prompt_embeds"],
                timestep=sigmas,
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
                guidance=torch.full((b,), 3.5),
                return_dict=False,
            ),
        )[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).reshape(b, c, h, w)
    return torch.func.functional_call(
        base,
        weights,
        (),
        dict(
            hidden_states=latents,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=sigmas * 1000,
            return_dict=False,
        ),
    )[0]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-qwenimage"])
@pytest.mark.parametrize("cat_weight", [0.0, 0.7])
def test_loss_and_gradients_match_a_hand_computation(name, cat_weight):
    family, model, base = _lora_model(name)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    noise, sigmas = sample_flow_inputs(family, latents, generator=g)
    assert 0 < float(sigmas.min()) and float(sigmas.max()) <= 1 and sigmas[0] != sigmas[1]
    cond, stripped = _conds(model, 2, seed=1)

    out = flow_cat_loss(family, model, latents, noise, sigmas, cond, stripped, cat_weight=cat_weight)
    out.loss.backward()

    # the same loss by hand: merged weights W + scale B A, leaves A and B for the gradient oracle
    lora = _lora_params(model)
    leaves = {
        n: (a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
        for n, (a, b) in lora.items()
    }
    merged = {f"{n}.weight": base.get_submodule(n).weight + ALPHA / RANK * b @ a for n, (a, b) in leaves.items()}
    s = sigmas.view(-1, 1, 1, 1)
    noisy, target = (1 - s) * latents + s * noise, noise - latents
    ldm = F.mse_loss(_hand_call(name, base, merged, noisy, sigmas, cond), target)
    loss = ldm
    if cat_weight:
        with torch.no_grad():
            teacher = _hand_call(name, base, {}, noisy, sigmas, stripped)
        cat = F.mse_loss(_hand_call(name, base, merged, noisy, sigmas, stripped), teacher)
        loss = ldm + cat_weight * cat
        assert_rel_close(out.cat, cat.detach(), 1e-5, "L_CAT")
        assert float(cat.detach()) > 1e-4  # the adapter moves the stripped prediction (B is not zero)
    else:
        assert out.cat is None
    loss.backward()
    assert_rel_close(out.ldm, ldm.detach(), 1e-5, "L_LDM")
    assert_rel_close(out.loss.detach(), loss.detach(), 1e-5, "L")

    # gradients land on the LoRA parameters alone, and equal the hand computation's
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    for n, (a, b) in lora.items():
        assert_rel_close(a.grad, leaves[n][0].grad, 1e-4, f"{n} dA")
        assert_rel_close(b.grad, leaves[n][1].grad, 1e-4, f"{n} dB")
    # the teacher pass left the LoRA switched on
    with torch.no_grad():
        assert not torch.equal(family.predict(model, noisy, sigmas, cond), family.predict(base, noisy, sigmas, cond))


def test_cat_weight_zero_is_one_forward_and_the_teacher_is_the_same_model():
    family, model, base = _lora_model("tiny-flux")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    latents = torch.randn(1, 16, 8, 8)
    noise, sigmas = sample_flow_inputs(family, latents, generator=torch.Generator().manual_seed(0))
    cond, stripped = _conds(model, 1, seed=2)
    plain = flow_cat_loss(family, model, latents, noise, sigmas, cond, stripped, cat_weight=0.0)
    assert len(calls) == 1 and plain.cat is None
    both = flow_cat_loss(family, model, latents, noise, sigmas, cond, stripped, cat_weight=1.0)
    assert len(calls) == 4 and torch.equal(both.ldm, plain.ldm)
    with torch.no_grad(), lora_disabled(model):
        off = family.predict(model, latents, sigmas, cond)
    with torch.no_grad():
        assert torch.equal(off, family.predict(base, latents, sigmas, cond))


def test_bad_arguments_are_refused():
    family, model, _ = _lora_model("tiny-flux")
    latents = torch.randn(1, 16, 8, 8)
    cond, _ = _conds(model, 1, seed=0)
    with pytest.raises(ValueError, match="cond_stripped"):
        flow_cat_loss(family, model, latents, latents, torch.ones(1), cond, cat_weight=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        flow_cat_loss(family, model, latents, latents, torch.ones(2), cond, cat_weight=0.0)
    with pytest.raises(ValueError, match="not a flow-matching family"):
        flow_cat_loss(FAMILIES["unet"], model, latents, latents, torch.ones(1), cond, cat_weight=0.0)


@pytest.mark.parametrize("family_name", ["sd3", "flux", "qwenimage"])
def test_sigmas_follow_the_diffusers_recipe(family_name):
    """u by compute_density_for_timestep_sampling, an index into the scheduler's grid, then the family's
    shift: SD3's static shift is the scheduler's own sigmas; Flux / Qwen-Image shift by the image's token
    count with the scheduler's exponential time_shift at the pipelines' calculate_shift mu."""
    family = FAMILIES[family_name]
    recipe, seq_len = family.flow, 1024
    got = recipe.sample_sigmas(64, seq_len, generator=torch.Generator().manual_seed(5))
    u = compute_density_for_timestep_sampling(
        recipe.weighting_scheme,
        64,
        recipe.logit_mean,
        recipe.logit_std,
        recipe.mode_scale,
        generator=torch.Generator().manual_seed(5),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**family.scheduler_config)
    picked = scheduler.sigmas[(u * 1000).long()]
    if scheduler.config.use_dynamic_shifting:
        c = scheduler.config
        mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        picked = scheduler.time_shift(mu, 1.0, picked)
    assert_rel_close(got, picked.float(), 1e-6, f"{family_name} sigmas")
    assert float(got.std()) > 0.05
