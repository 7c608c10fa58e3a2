"""diffusers itself is the oracle: files catfast writes load with ``pipe.load_lora_weights`` and give the
same UNet and text-encoder outputs as catfast's merge and as ``attach_adapter``; files diffusers writes
(old ``lora.down`` keys or peft keys, with and without LoRA metadata) read in catfast with the right
alpha and output. All LoRA B random and nonzero, alpha != rank, fp32, rel error <= 1e-5."""

import copy

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from catfast.adapters import merge_adapter_, read_adapter, write_adapter
from catfast.errors import AdapterShapeError, CatfastError
from catfast.integrations.factory import build_base, build_unet
from catfast.integrations.peft_adapters import attach_adapter, extract_adapter
from catfast.testing import (
    RTOL,
    SGM_SDXL,
    assert_rel_close,
    assert_same_layers,
    random_adapter,
    randomize_lora_,
    snapshot,
    unet_inputs,
)

PROMPT = ["a cat statue on a carpet"]


@pytest.fixture(scope="module")
def sd_base():
    return build_base("tiny")


@pytest.fixture(scope="module")
def sdxl_base():
    return build_base("tiny-sdxl")


def sd_pipeline(base):
    """A fresh StableDiffusionPipeline on copies of the tiny base (so each test may load into it)."""
    parts = {k: copy.deepcopy(getattr(base, k)) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(base):
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    return StableDiffusionXLPipeline(**{k: copy.deepcopy(getattr(base, k)) for k in names})


@torch.no_grad()
def unet_out(unet):
    x, t, _ = unet_inputs()
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.rand(2, 6, generator=g),
        }
    return unet(x, t, context, **extra).sample


@torch.no_grad()
def text_out(text_encoder, tokenizer):
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def outputs(pipe, components, models=None):
    """Output of each component on fixed inputs (UNet noise prediction, text-encoder states), using
    ``models[c]`` instead of the pipeline's own component where given."""
    out = {}
    for c in components:
        model = (models or {}).get(c, getattr(pipe, c))
        tokenizer = pipe.tokenizer_2 if c == "text_encoder_2" else pipe.tokenizer
        out[c] = unet_out(model) if c == "unet" else text_out(model, tokenizer)
    return out


def merged_outputs(pipe, adapter):
    """Outputs of copies of ``pipe``'s components with ``adapter`` merged by catfast."""
    models = {c: copy.deepcopy(getattr(pipe, c)) for c in adapter.components()}
    for c, model in models.items():
        merge_adapter_(model, adapter, component=c)
    return outputs(pipe, adapter.components(), models)


def assert_outputs_close(got, want, what):
    assert got.keys() == want.keys()
    for c in want:
        assert_rel_close(got[c], want[c], RTOL, f"{what}: {c}")


def assert_diffusers_scales(model, adapter, component, adapter_name):
    """peft's per-module scaling inside the diffusers-loaded model equals each layer's alpha / r."""
    layers = adapter.component(component)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in module.scaling:
            key = name if name in layers else f"text_model.{name}"
            found[key] = (module.r[adapter_name], module.scaling[adapter_name])
    assert found.keys() == layers.keys()
    for path, layer in layers.items():
        assert found[path][0] == layer.rank and found[path][1] == pytest.approx(layer.scale, rel=1e-6), path


# ------------------------------------------------------------------------- catfast -> diffusers


# diffusers' kohya loader keeps per-layer alphas only for some modules (attention processors and text
# encoder layers fall back to the most common alpha), so kohya files are checked with one alpha != rank.
@pytest.mark.parametrize("fmt, alphas", [("diffusers", (3.0, 5.5, 1.0, 2.5)), ("kohya", (6.0,))])
def test_catfast_file_loads_in_diffusers(sd_base, tmp_path, fmt, alphas):
    pipe = sd_pipeline(sd_base)
    adapter = random_adapter({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, alphas=alphas)
    want = merged_outputs(pipe, adapter)
    path = tmp_path / f"catfast_{fmt}.safetensors"
    write_adapter(adapter, path, format=fmt)

    pipe.load_lora_weights(str(path), adapter_name="cf")
    for c in ("unet", "text_encoder"):
        assert_diffusers_scales(getattr(pipe, c), adapter, c, "cf")
    assert_outputs_close(outputs(pipe, ["unet", "text_encoder"]), want, f"diffusers load of a catfast {fmt} file")

    attached = sd_pipeline(sd_base)
    for c in ("unet", "text_encoder"):
        attach_adapter(getattr(attached, c), read_adapter(path), component=c)
    assert_outputs_close(outputs(attached, ["unet", "text_encoder"]), want, "attach_adapter")


@pytest.mark.parametrize("fmt, alphas", [("diffusers", (3.0, 5.5, 1.0, 2.5)), ("kohya", (6.0,))])
def test_sdxl_file_with_two_text_encoders_loads_in_diffusers(sdxl_base, tmp_path, fmt, alphas):
    pipe = sdxl_pipeline(sdxl_base)
    components = ["unet", "text_encoder", "text_encoder_2"]
    adapter = random_adapter({c: getattr(pipe, c) for c in components}, alphas=alphas)
    if fmt == "kohya":  # diffusers' kohya loader mangles add_embedding.linear_N (it knows only SGM label_emb)
        adapter.layers = {k: v for k, v in adapter.layers.items() if ".add_embedding." not in k}
    want = merged_outputs(pipe, adapter)
    path = tmp_path / f"sdxl_{fmt}.safetensors"
    write_adapter(adapter, path, format=fmt)
    if fmt == "kohya":
        keys = safetensors.torch.load_file(path).keys()
        assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert_same_layers(read_adapter(path), adapter)

    pipe.load_lora_weights(str(path), adapter_name="cf")
    assert_outputs_close(outputs(pipe, components), want, f"diffusers SDXL load of a catfast {fmt} file")


# ------------------------------------------------------------------------- diffusers -> catfast


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj"]


def _peft_pipeline(base):
    """A pipeline with a trained-looking peft adapter: mixed ranks and alphas != rank, random B."""
    pipe = sd_pipeline(base)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=6,
            target_modules=UNET_TARGETS,
            rank_pattern={"proj_in": 2, "conv1": 3},
            alpha_pattern={"to_k": 3, "conv1": 10, "time_emb_proj": 1.5},
        )
    )
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "fc1"]))
    randomize_lora_(pipe.unet, seed=1)
    randomize_lora_(pipe.text_encoder, seed=2)
    return pipe


@pytest.mark.parametrize("old_keys", [True, False], ids=["lora.down-keys", "peft-keys"])
@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no-metadata"])
def test_diffusers_written_file_reads_in_catfast(sd_base, tmp_path, old_keys, with_metadata):
    trained = _peft_pipeline(sd_base)
    layers = {c: get_peft_model_state_dict(getattr(trained, c)) for c in ("unet", "text_encoder")}
    if old_keys:  # what diffusers' training scripts save
        layers = {c: convert_state_dict_to_diffusers(sd) for c, sd in layers.items()}
    metadata = {}
    if with_metadata:
        metadata = {f"{c}_lora_adapter_metadata": getattr(trained, c).peft_config["default"].to_dict() for c in layers}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"], **metadata
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    adapter = read_adapter(path)
    assert adapter.source_format == ("diffusers" if old_keys else "peft")

    if with_metadata:  # the file restores the trained adapter exactly
        truth = {c: extract_adapter(getattr(trained, c), component=c) for c in ("unet", "text_encoder")}
        assert_same_layers(adapter, type(adapter)({**truth["unet"].layers, **truth["text_encoder"].layers}))
    else:  # no alpha anywhere: diffusers (and catfast) use alpha = rank, i.e. peft scaling 1
        assert all(layer.alpha == layer.rank for layer in adapter.layers.values())
        for module in [*trained.unet.modules(), *trained.text_encoder.modules()]:
            if isinstance(module, BaseTunerLayer):
                module.scaling["default"] = 1.0
    want = outputs(trained, ["unet", "text_encoder"])
    assert_outputs_close(merged_outputs(sd_pipeline(sd_base), adapter), want, "catfast merge of a diffusers file")
    if not old_keys:
        # diffusers agrees. (With the mixed lora.down + lora_A keys that convert_state_dict_to_diffusers
        # makes, diffusers 0.42 looks at the first key only and silently skips the attention layers.)
        loaded = sd_pipeline(sd_base)
        loaded.load_lora_weights(str(path))
        assert_outputs_close(outputs(loaded, ["unet", "text_encoder"]), want, "diffusers load of its own file")


def test_save_lora_adapter_file_reads_in_catfast(sd_base, tmp_path):
    """``unet.save_lora_adapter`` (peft keys, config in the metadata) is another diffusers writer."""
    trained = _peft_pipeline(sd_base)
    trained.unet.save_lora_adapter(tmp_path, adapter_name="default")
    adapter = read_adapter(tmp_path)  # the folder diffusers saved into
    assert_same_layers(adapter, extract_adapter(trained.unet))
    assert_outputs_close(
        merged_outputs(sd_pipeline(sd_base), adapter), outputs(trained, ["unet"]), "catfast merge of save_lora_adapter"
    )


def test_extract_write_read_matches_the_peft_model(sd_base, tmp_path):
    """The trainer's save path: extract_adapter -> write (both formats) -> read -> merge == peft output."""
    trained = _peft_pipeline(sd_base)
    want = outputs(trained, ["unet"])
    for fmt in ("diffusers", "kohya"):
        write_adapter(extract_adapter(trained.unet), tmp_path / f"{fmt}.safetensors", format=fmt)
        adapter = read_adapter(tmp_path / f"{fmt}.safetensors")
        assert_outputs_close(merged_outputs(sd_pipeline(sd_base), adapter), want, f"extracted -> {fmt}")


def test_sgm_names_agree_with_diffusers_conversion(tmp_path):
    from diffusers import UNet2DConditionModel

    from catfast.integrations.factory import unet_config

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**unet_config("sdxl"))
    state = {}
    for stem in SGM_SDXL:
        state[f"lora_unet_{stem}.lora_down.weight"] = torch.ones(2, 3)
        state[f"lora_unet_{stem}.lora_up.weight"] = torch.ones(3, 2)
    safetensors.torch.save_file(state, tmp_path / "sgm.safetensors")
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=sdxl.config)
    unet_part = {k.removeprefix("unet."): v for k, v in converted.items()}
    diffusers_paths = {k.split(".lora_A.")[0] for k in convert_unet_state_dict_to_peft(unet_part) if ".lora_A." in k}
    catfast_paths = {k.removeprefix("unet.") for k in read_adapter(tmp_path / "sgm.safetensors").layers}
    assert catfast_paths == diffusers_paths


# ---------------------------------------------------------------------------------- attach errors


def test_attach_rejects_a_misfit_and_leaves_no_peft_layers(sd_base):
    unet = copy.deepcopy(sd_base.unet)
    adapter = random_adapter({"unet": unet}, leaves=("to_q",))
    adapter.layers.update(random_adapter({"unet": build_unet("small")}, leaves=("mid_block.resnets.0.conv1",)).layers)
    before = snapshot(unet)
    with pytest.raises(AdapterShapeError, match=r"mid_block\.resnets\.0\.conv1: weight \(48, 48, 3, 3\)"):
        attach_adapter(unet, adapter)
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    assert not getattr(unet, "peft_config", None)
    assert unet.state_dict().keys() == before.keys()


def test_attach_refuses_a_used_name_and_keeps_the_first(sd_base):
    unet = copy.deepcopy(sd_base.unet)
    first = random_adapter({"unet": unet}, leaves=("to_q", "conv2"))
    attach_adapter(unet, first, adapter_name="style")
    with pytest.raises(CatfastError, match="already has an adapter named 'style'"):
        attach_adapter(unet, random_adapter({"unet": sd_base.unet}, seed=1, leaves=("to_q",)), adapter_name="style")
    assert_same_layers(extract_adapter(unet, "style"), first)
