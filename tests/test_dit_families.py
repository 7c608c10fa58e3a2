"""Model families and the diffusion-transformer factories, against diffusers' own pipelines as oracles:
folders written by `catfast models init` load offline and run, family_of finds each family, the families'
packing and forward calls match what the pipelines do, and their LoRA targets exist in the models."""

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from catfast.cli import main
from catfast.errors import ModelLoadError
from catfast.integrations.factory_dit import build_transformer, transformer_config
from catfast.integrations.families import FAMILIES, family_named, family_of
from catfast.integrations.families.flux import image_ids, pack, unpack
from catfast.testing import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = {"tiny-flux": FluxPipeline, "tiny-sd3": StableDiffusion3Pipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tiny-flux and tiny-sd3 written by the command line."""
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


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_folder_runs_in_diffusers(pipes, name):
    """The pipeline folder loads offline and makes a picture (its T5 tokenizer is catfast's, built here)."""
    image = pipes[name](
        "a photo of sks cat",
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=16,
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


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_predict_is_the_pipelines_denoiser_call(pipes, name):
    """One Euler step from sigma 1 to 0 gives x0 = x1 - v: the pipeline's own latents after one step
    equal the family's prediction at sigma 1 on the pipeline's own prompt embeddings (Flux with its
    guidance embedding at the recipe's 3.5; SD3 at guidance 1, no CFG rows)."""
    pipe, family = pipes[name], family_of(pipes[name])
    x1 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    if name == "tiny-flux":
        embeds, pooled, _ = pipe.encode_prompt("a photo of sks cat", prompt_2=None, max_sequence_length=16)
        given, guidance = pack(x1), family.flow.guidance
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a photo of sks cat", None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
        given, guidance = x1, 1.0
    out = pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        latents=given,
        num_inference_steps=1,
        height=32,
        width=32,
        guidance_scale=guidance,
        output_type="latent",
        max_sequence_length=16,
    ).images
    if name == "tiny-flux":
        out = unpack(out, 16, 16)
    with torch.no_grad():
        v = family.predict(
            pipe.transformer, x1, torch.ones(1), {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        )
    assert_rel_close(x1 - v, out, 1e-5, f"{name} one Euler step")


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


def test_models_init_refuses_transformer_only_names(tmp_path):
    from catfast.integrations.factory import init_model_folder

    with pytest.raises(ModelLoadError, match="transformer only"):
        init_model_folder("flux-narrow", tmp_path / "x")
