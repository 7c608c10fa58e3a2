"""Model families and the diffusion-transformer factories, against diffusers' own pipelines as oracles:
folders written by `catfast models init` load offline and run, family_of finds each family, the families'
packing and forward calls match what the pipelines do, and their LoRA targets exist in the models."""

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline

from catfast.cli import main
from catfast.errors import ModelLoadError
from catfast.integrations.factory_dit import build_transformer, transformer_config
from catfast.integrations.families import FAMILIES, family_named, family_of
from catfast.integrations.families.flux import image_ids, pack, unpack
from catfast.testing import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = {"tiny-flux": FluxPipeline, "tiny-sd3": StableDiffusion3Pipeline, "tiny-qwenimage": QwenImagePipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tiny-flux, tiny-sd3 and tiny-qwenimage written by the command line."""
    root = tmp_path_factory.mktemp("dit")
    for name in PIPELINES:
        result = CliRunner().invoke(main, ["models", "init", name, str(root / name)])
        assert result.exit_code == 0, result.output
    return {name: root / name for name in PIPELINES}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: cls.from_pretrained(folders[name], local_files_only=True) for name, cls in PIPELINES.items()}


def test_family_of_folders_pipelines_and_models(folders, pipes, tiny):
    assert family_of(folders["tiny-flux"]) is FAMILIES["flux"] is family_named("flux")
    assert family_of(folders["tiny-sd3"]).name == "sd3"
    assert family_of(tiny).name == "unet"
    assert family_of(pipes["tiny-flux"]).name == "flux"
    assert family_of(pipes["tiny-sd3"].transformer).name == "sd3"
    assert family_of(build_transformer("tiny-qwenimage")).name == "qwenimage"
    assert family_of(folders["tiny-qwenimage"]).name == "qwenimage"


def test_unsupported_family_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ModelLoadError) as err:
        family_of(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "WanPipeline" in message and "FluxPipeline" in message
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        family_of(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="Linear is not supported"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(ModelLoadError, match="unknown model family"):
        family_named("wan")


@pytest.mark.parametrize("name", list(PIPELINES))
def test_folder_runs_in_diffusers(pipes, name):
    """The pipeline folder loads offline and makes a picture (its T5 / Qwen tokenizer is catfast's, built here)."""
    image = pipes[name](
        "a photo of sks cat",
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=16 if name != "tiny-qwenimage" else 512,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0


def test_flux_packing_matches_the_pipeline():
    latents = torch.randn(2, 16, 6, 8)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(unpack(packed, 6, 8), latents)
    # the pipeline's unpack takes pixel sizes (vae_scale_factor 8 here)
    assert torch.equal(unpack(packed, 6, 8), FluxPipeline._unpack_latents(packed, 48, 64, 8))
    assert torch.equal(image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("name", list(PIPELINES))
def test_predict_is_the_pipelines_denoiser_call(pipes, name):
    """The pipeline's own first Euler step, x_1 = x_0 + (sigma_1 - sigma_0) v, gives the denoiser's velocity
    v; the family's prediction at sigma_0 on the pipeline's own prompt embeddings equals it (Flux with its
    guidance embedding at the recipe's 3.5; SD3 at guidance 1 and Qwen-Image without a negative prompt: no
    CFG rows)."""
    pipe, family = pipes[name], family_of(pipes[name])
    x0 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    if name == "tiny-flux":
        embeds, pooled, _ = pipe.encode_prompt("a photo of sks cat", prompt_2=None, max_sequence_length=16)
        cond, kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, dict(guidance_scale=3.5)
    elif name == "tiny-sd3":
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of sks cat", None, None, do_classifier_free_guidance=False)
        cond, kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, dict(guidance_scale=1.0)
    else:
        embeds, mask = pipe.encode_prompt("a photo of sks cat")
        cond, kwargs = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}, {}
    steps = []
    pipe(
        **{f"{key}": value for key, value in cond.items()},
        latents=x0 if name == "tiny-sd3" else pack(x0),
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: steps.append(kw["latents"].clone()) or kw,
        **kwargs,
    )
    sigmas = pipe.scheduler.sigmas
    x1 = steps[0] if name == "tiny-sd3" else unpack(steps[0], 16, 16)
    with torch.no_grad():
        v = family.predict(pipe.transformer, x0, sigmas[:1], cond)
    assert_rel_close(v, (x1 - x0) / (sigmas[1] - sigmas[0]), 1e-4, f"{name} velocity")


def test_qwen_tokenizer_drops_the_template_like_qwen():
    """QwenImagePipeline drops the first 34 tokens of its template (Qwen2.5's count of the system prefix);
    the tokenizer built here counts the same, so the first kept token is the caption's."""
    from catfast.integrations.factory_qwen import TEMPLATE, qwen_tokenizer

    tokenizer = qwen_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(TEMPLATE.format("a photo of sks cat")).input_ids)
    assert tokens[33:39] == ["Ċ", "a", "Ġphoto", "Ġof", "Ġsks", "Ġcat"]  # the template is diffusers' own:
    assert TEMPLATE == QwenImagePipeline(None, None, None, None, None).prompt_template_encode


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-qwenimage"])
def test_default_targets_name_linear_layers(name):
    """Each of the family's LoRA target names matches at least one Linear of the model, and peft takes them."""
    from peft import LoraConfig

    model, family = build_transformer(name), FAMILIES[{"tiny-flux": "flux", "tiny-sd3": "sd3"}.get(name, "qwenimage")]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in family.default_targets:
        assert any(n == target or n.endswith("." + target) for n in linears), (name, target)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(family.default_targets)))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_flux_narrow_has_flux_widths():
    model = build_transformer("flux-narrow", device="meta")
    config = transformer_config("flux-narrow")
    assert model.inner_dim == 3072 and config["attention_head_dim"] == 128 and sum(config["axes_dims_rope"]) == 128
    assert model.context_embedder.in_features == 4096 and model.x_embedder.in_features == 64
    assert 0.4e9 < sum(p.numel() for p in model.parameters()) < 0.7e9
    assert {k: v for k, v in config.items() if "layers" not in k} == {
        k: v for k, v in transformer_config("flux-dev").items() if "layers" not in k
    }


# published transformer sizes: FLUX.1 [dev] 12 B (11.9), SD3 Medium 2 B, SD3.5 Large 8.1 B, Qwen-Image 20 B
@pytest.mark.parametrize(
    "name,billions", [("flux-dev", 11.9), ("sd3-medium", 2.03), ("sd35-large", 8.06), ("qwen-image", 20.4)]
)
def test_real_configs_have_the_published_sizes(name, billions):
    model = build_transformer(name, device="meta")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 0.01 * billions


def test_models_init_refuses_transformer_only_names(tmp_path):
    from catfast.integrations.factory import init_model_folder

    with pytest.raises(ModelLoadError, match="transformer only"):
        init_model_folder("flux-narrow", tmp_path / "x")


@pytest.mark.parametrize("name", list(PIPELINES))
def test_decode_latents_is_the_pipelines_decode(pipes, name):
    """The pipeline's picture (output_type "pt") is its latents (output_type "latent") through the family's
    decode_latents, VAE shift / per-channel statistics included."""
    pipe, family = pipes[name], family_of(pipes[name])
    run = dict(num_inference_steps=2, height=32, width=32, guidance_scale=1.0)
    if name != "tiny-qwenimage":
        run["max_sequence_length"] = 16
    latents = pipe("a red star", output_type="latent", generator=torch.Generator().manual_seed(0), **run).images
    image = pipe("a red star", output_type="pt", generator=torch.Generator().manual_seed(0), **run).images
    if name != "tiny-sd3":
        latents = unpack(latents, 16, 16)
    with torch.no_grad():
        pixels = family.decode_latents(pipe.vae, latents)
    assert_rel_close((pixels / 2 + 0.5).clamp(0, 1), image, 1e-5, f"{name} decoded")


@pytest.mark.parametrize("name", list(PIPELINES))
def test_encode_latents_inverts_the_scale_and_shift(pipes, name):
    """encode_latents' normalisation is the one decode_latents undoes (decode_latents is the pipeline's, test
    above): decoding the encoded latents gives the VAE's own decode of the posterior sample z (same generator),
    and the latents are not z itself."""
    pipe, family = pipes[name], family_of(pipes[name])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        a = family.encode_latents(pipe.vae, pixels, generator=torch.Generator().manual_seed(3))
        b = family.encode_latents(pipe.vae, pixels, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == (2, 16, 16, 16)
        frames = pixels[:, :, None] if name == "tiny-qwenimage" else pixels
        z = pipe.vae.encode(frames).latent_dist.sample(torch.Generator().manual_seed(3))
        want = pipe.vae.decode(z, return_dict=False)[0]
        want = want[:, :, 0] if name == "tiny-qwenimage" else want
        assert_rel_close(family.decode_latents(pipe.vae, a), want, 1e-5, f"{name} round trip")
        assert float((a - (z[:, :, 0] if name == "tiny-qwenimage" else z)).abs().max()) > 1e-3  # normalised


@pytest.mark.parametrize("name", list(PIPELINES))
def test_a_batch_of_captions_predicts_row_by_row(pipes, name):
    """encode_prompt of two captions of different lengths, then one predict call, gives each row what the
    caption alone gives (Qwen-Image: the shorter row is padded and masked; Flux, SD3: T5 pads to the length)."""
    pipe, family = pipes[name], family_of(pipes[name])
    captions = ["a red star", "sks, a photo of a cat sitting on the beach in the morning"]
    length = None if name == "tiny-qwenimage" else 24
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        both = family.encode_prompt(pipe, captions, max_sequence_length=length)
        assert both["prompt_embeds"].shape[0] == 2
        if name == "tiny-qwenimage":
            assert both["prompt_embeds_mask"] is not None and not both["prompt_embeds_mask"][0].all()
        batched = family.predict(pipe.transformer, latents, sigmas, both)
        for i, caption in enumerate(captions):
            one = family.encode_prompt(pipe, [caption], max_sequence_length=length)
            alone = family.predict(pipe.transformer, latents[i : i + 1], sigmas[i : i + 1], one)
            assert_rel_close(batched[i : i + 1], alone, 1e-5, f"{name} row {i}")


def test_flux_without_guidance_embedding_gets_no_guidance():
    """FLUX.1-schnell's transformer has no guidance embedding: predict passes guidance=None (a value would
    be refused by diffusers' embedding-free time projection)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(transformer_config("tiny-flux"), guidance_embeds=False)).eval()
    latents, sigmas = torch.randn(2, 16, 8, 8), torch.tensor([0.2, 0.9])
    cond = {"prompt_embeds": torch.randn(2, 5, 32), "pooled_prompt_embeds": torch.randn(2, 32)}
    with torch.no_grad():
        got = FAMILIES["flux"].predict(model, latents, sigmas, cond)
        want = model(
            hidden_states=FluxPipeline._pack_latents(latents, 2, 16, 8, 8),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=sigmas,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
            txt_ids=torch.zeros(5, 3),
            return_dict=False,
        )[0]
    assert_rel_close(got, FluxPipeline._unpack_latents(want, 64, 64, 8).reshape(2, 16, 8, 8), 1e-6, "schnell")


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_a_caption_longer_than_the_limit_is_truncated_with_a_warning(pipes, name, caplog):
    """As diffusers does: the T5 caption is cut at max_sequence_length and the pipeline logs the part it dropped,
    also where catfast's command line has lowered diffusers' logging to errors (``quiet_libraries``)."""
    from diffusers.utils import logging as diffusers_logging

    family, pipe = family_of(pipes[name]), pipes[name]
    long_caption = "sks, a photo of a red cat sitting on a large blue box in a green forest " * 4
    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with torch.no_grad():
            cond = family.encode_prompt(pipe, [long_caption], max_sequence_length=8)
    finally:
        diffusers_logging.set_verbosity(before)
    assert cond["prompt_embeds"].shape[1] == (8 if name == "tiny-flux" else 77 + 8)  # SD3: CLIP's 77, then T5's
    assert any("truncated" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
