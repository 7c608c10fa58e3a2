"""LoRA files of the diffusion transformers (Flux, SD3, Qwen-Image) against diffusers' own pipelines as oracles:
catfast's diffusers-format files load with ``pipe.load_lora_weights`` and predict what the source LoRA predicts
(alpha kept), sd-scripts' kohya FLUX.1 files and ai-toolkit's files read into the layers diffusers loads (and,
where diffusers 0.42.1 cannot load them, the layers sd-scripts' fused weights define), and an adapter for the
other kind of denoiser is refused in one line."""

import json

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import read_adapter, write_adapter
from catfast.adapters.kohya_names import kohya_to_path
from catfast.cli import main
from catfast.errors import CatfastError
from catfast.integrations.factory_dit import init_dit_folder
from catfast.integrations.families import family_of
from catfast.integrations.peft_adapters import add_lora, attach_adapter, extract_adapter, randomize_lora_
from catfast.testing import assert_rel_close, random_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = {"tiny-flux": FluxPipeline, "tiny-sd3": StableDiffusion3Pipeline, "tiny-qwenimage": QwenImagePipeline}
# what `adapter info` can tell from the module names of a LoRA on the family's default targets: Flux's
# single blocks; SD3's and Qwen-Image's attention projections are named as every family's (None)
FAMILY = {"tiny-flux": "flux", "tiny-sd3": None, "tiny-qwenimage": None}
RANK, ALPHA = 4, 6.0  # alpha != rank: a file that lost alpha predicts otherwise


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: init_dit_folder(name, root / name) for name in PIPELINES}


def fresh(folders, name):
    return PIPELINES[name].from_pretrained(folders[name], local_files_only=True)


@pytest.fixture(scope="module")
def inputs(folders):
    """(latents, sigmas, cond) per pipeline: the family's own prompt encoding of one caption."""
    out = {}
    for name in PIPELINES:
        pipe, family = fresh(folders, name), family_of(folders[name])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            cond = family.encode_prompt(
                pipe, ["a photo of sks cat"], max_sequence_length=None if "qwen" in name else 16
            )
        out[name] = (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.7]), cond)
    return out


def predict(folders, inputs, name, transformer):
    latents, sigmas, cond = inputs[name]
    with torch.no_grad():
        return family_of(folders[name]).predict(transformer, latents, sigmas, cond)


def assert_same_adapter(got: LoraAdapter, want: LoraAdapter):
    assert sorted(got.layers) == sorted(want.layers)
    for key, layer in want.layers.items():
        assert torch.equal(got.layers[key].down, layer.down) and torch.equal(got.layers[key].up, layer.up), key
        assert got.layers[key].alpha == layer.alpha, key


# ----------------------------------------------------------------------------- diffusers format, written


@pytest.mark.parametrize("name", list(PIPELINES))
def test_written_file_loads_in_diffusers_and_round_trips(folders, inputs, tmp_path, name):
    """A peft LoRA (random B, alpha 6 at rank 4) written by catfast: the pipeline's load_lora_weights predicts
    what the source transformer predicts; read -> write -> read is bit-exact and keeps alpha."""
    source = fresh(folders, name).transformer
    add_lora(source, rank=RANK, alpha=ALPHA, target_modules=family_of(folders[name]).default_targets)
    randomize_lora_(source, seed=1, std=0.2)
    adapter = extract_adapter(source)  # the component follows the model: transformer
    assert adapter.components() == ["transformer"] and {v.alpha for v in adapter.layers.values()} == {ALPHA}
    path = tmp_path / "lora.safetensors"
    write_adapter(adapter, path)
    header = json.loads(safetensors.safe_open(path, "pt").metadata()["lora_adapter_metadata"])
    assert header["transformer.lora_alpha"] == ALPHA and header["transformer.r"] == RANK

    loaded = fresh(folders, name)
    loaded.load_lora_weights(path)
    want = predict(folders, inputs, name, source)
    assert_rel_close(predict(folders, inputs, name, loaded.transformer), want, 1e-5, f"{name}: diffusers-loaded")
    base = predict(folders, inputs, name, fresh(folders, name).transformer)
    assert not torch.allclose(want, base, atol=1e-4)  # the LoRA matters

    read = read_adapter(path)
    assert read.source_format == "peft" and read.describe()["family"] == FAMILY[name]
    assert_same_adapter(read, adapter)
    write_adapter(read, tmp_path / "again.safetensors")
    assert_same_adapter(read_adapter(tmp_path / "again.safetensors"), adapter)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_per_layer_rank_and_alpha_on_every_linear(folders, inputs, tmp_path, name):
    """A LoRA on every Linear/Conv2d of the transformer with ranks 2-4 and alphas 1-5.5 cycling: diffusers
    (rank/alpha patterns of the metadata) and catfast's attach predict the same."""
    adapter = random_adapter({"transformer": fresh(folders, name).transformer}, seed=2)
    assert adapter.describe()["family"] == name.removeprefix("tiny-")  # every Linear: pos_embed, img_mlp, ...
    write_adapter(adapter, tmp_path / "mixed.safetensors")
    loaded, attached = fresh(folders, name), fresh(folders, name)
    loaded.load_lora_weights(tmp_path / "mixed.safetensors")
    attach_adapter(attached.transformer, read_adapter(tmp_path / "mixed.safetensors"))
    want = predict(folders, inputs, name, attached.transformer)
    assert_rel_close(predict(folders, inputs, name, loaded.transformer), want, 1e-5, f"{name}: mixed ranks")


# ------------------------------------------------------------------------------------- kohya FLUX.1

D = 32  # tiny-flux's hidden size (2 heads x 16); its MLPs are 4x wider
# sd-scripts' FLUX.1 module names and their (out, in) shapes on tiny-flux. diffusers 0.42.1 loads the double
# blocks' and single blocks' linear2/modulation layers; the rest (linear1, whose split it fixes at FLUX.1's
# 3072 width, and the embedders / final layer, which it drops) are checked against the fused weights below.
KOHYA_DIFFUSERS_LOADS = {
    "double_blocks_0_img_attn_qkv": (3 * D, D),
    "double_blocks_0_img_attn_proj": (D, D),
    "double_blocks_0_img_mlp_0": (4 * D, D),
    "double_blocks_0_img_mlp_2": (D, 4 * D),
    "double_blocks_0_img_mod_lin": (6 * D, D),
    "double_blocks_0_txt_attn_qkv": (3 * D, D),
    "double_blocks_0_txt_attn_proj": (D, D),
    "double_blocks_0_txt_mlp_0": (4 * D, D),
    "double_blocks_0_txt_mlp_2": (D, 4 * D),
    "double_blocks_0_txt_mod_lin": (6 * D, D),
    "single_blocks_0_linear2": (D, 5 * D),
    "single_blocks_0_modulation_lin": (3 * D, D),
}
KOHYA_REST = {
    "single_blocks_0_linear1": (7 * D, D),
    "img_in": (D, 64),
    "txt_in": (D, 32),
    "time_in_in_layer": (D, 256),
    "time_in_out_layer": (D, D),
    "vector_in_in_layer": (D, 32),
    "guidance_in_out_layer": (D, D),
    "final_layer_linear": (64, D),
    "final_layer_adaLN_modulation_1": (2 * D, D),
}
# the diffusers modules of each BFL module, in the fused weight's row order (diffusers' converter's map)
BFL_ROWS = {
    "single_blocks_0_linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in_out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in_in_layer": ["time_text_embed.text_embedder.linear_1"],
    "guidance_in_out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer_linear": ["proj_out"],
}  # fmt: skip


def kohya_file(path, shapes, *, seed, rank=4):
    """A kohya FLUX.1 LoRA as sd-scripts' networks/lora_flux.py saves it: lora_unet_<name>.lora_down.weight,
    .lora_up.weight and a scalar .alpha per module (alphas 1..4 cycling, rank 4)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (name, (out, inp)) in enumerate(shapes.items()):
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.2
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(float(1 + i % 4))
    safetensors.torch.save_file(tensors, str(path), {"ss_network_module": "networks.lora_flux"})
    return tensors


def test_kohya_flux_matches_diffusers(folders, inputs, tmp_path):
    path = tmp_path / "kohya.safetensors"
    kohya_file(path, KOHYA_DIFFUSERS_LOADS, seed=3)
    adapter = read_adapter(path)
    assert adapter.source_format == "kohya" and adapter.components() == ["transformer"]
    assert adapter.describe()["family"] == "flux" and adapter.metadata["ss_network_module"] == "networks.lora_flux"
    assert {adapter.layers[f"transformer.transformer_blocks.0.attn.{p}"].alpha for p in ("to_q", "to_k", "to_v")} == {1}
    loaded, attached = fresh(folders, "tiny-flux"), fresh(folders, "tiny-flux")
    loaded.load_lora_weights(path)
    attach_adapter(attached.transformer, adapter)
    want = predict(folders, inputs, "tiny-flux", loaded.transformer)
    assert_rel_close(predict(folders, inputs, "tiny-flux", attached.transformer), want, 1e-5, "kohya FLUX.1")
    base = predict(folders, inputs, "tiny-flux", fresh(folders, "tiny-flux").transformer)
    assert not torch.allclose(want, base, atol=1e-4)


@torch.no_grad()
def test_kohya_flux_fused_layers_match_the_fused_weights(folders, inputs, tmp_path):
    """linear1, the embedders and the final layer: catfast's attached adapter predicts what the base predicts
    with each kohya update ``alpha / r * up @ down`` added to BFL's fused weight (the diffusers weights stacked
    in row order; the final adaLN's rows are (shift, scale) in BFL's model, (scale, shift) in diffusers')."""
    path = tmp_path / "kohya.safetensors"
    tensors = kohya_file(path, {**KOHYA_DIFFUSERS_LOADS, **KOHYA_REST}, seed=4)
    attached, merged = fresh(folders, "tiny-flux"), fresh(folders, "tiny-flux")
    attach_adapter(attached.transformer, read_adapter(path))
    modules = dict(merged.transformer.named_modules())
    for name in KOHYA_REST:
        down, up = tensors[f"lora_unet_{name}.lora_down.weight"], tensors[f"lora_unet_{name}.lora_up.weight"]
        delta = float(tensors[f"lora_unet_{name}.alpha"]) / down.shape[0] * up @ down
        if name == "final_layer_adaLN_modulation_1":
            shift, scale = delta.chunk(2)
            modules["norm_out.linear"].weight += torch.cat([scale, shift])
            continue
        rows = BFL_ROWS[name]
        fused = torch.cat([modules[r].weight for r in rows]) + delta
        for r, part in zip(rows, fused.split([modules[r].weight.shape[0] for r in rows]), strict=True):
            modules[r].weight.copy_(part)
    # the layers diffusers loads: its own loader
    merged.load_lora_weights({k: v for k, v in tensors.items() if k.split(".")[0][10:] in KOHYA_DIFFUSERS_LOADS})
    want = predict(folders, inputs, "tiny-flux", merged.transformer)
    assert_rel_close(predict(folders, inputs, "tiny-flux", attached.transformer), want, 1e-5, "kohya FLUX.1, fused")


def test_kohya_flux_split_matches_diffusers_converter_at_flux1_width(tmp_path):
    """At FLUX.1's widths (3072 hidden, 12288 MLP), where diffusers' converter can split them: the double
    block's qkv and the single block's linear1 give the same per-module updates (diffusers folds alpha into
    the factors; catfast keeps it)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    width = 3072
    shapes = {"double_blocks_0_img_attn_qkv": (3 * width, width), "single_blocks_0_linear1": (7 * width, width)}
    tensors = kohya_file(tmp_path / "flux1.safetensors", shapes, seed=5)
    ours = read_adapter(tmp_path / "flux1.safetensors")
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    assert len(ours.layers) == 7 and len(theirs) == 14
    x = torch.randn(width, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for key, layer in ours.layers.items():
        assert layer.alpha == (1.0 if "single" not in key else 2.0)  # kohya_file's alphas: 1, 2, ...
        a, b = theirs[f"{key}.lora_A.weight"].double(), theirs[f"{key}.lora_B.weight"].double()
        assert_rel_close(layer.scale * (layer.up.double() @ (layer.down.double() @ x)), b @ (a @ x), 1e-12, key)


# ---------------------------------------------------------------------------------------- ai-toolkit


def ai_toolkit_file(folders, name, path, prefix):
    """What ai-toolkit saves (toolkit/network_mixins.py, peft_format): the LoRA's lora_A/lora_B under
    ``prefix`` ("transformer." for Flux, "diffusion_model." for its newer models), no alphas, no LoRA config
    (so alpha = rank, as diffusers assumes). Random B, rank 4 on the family's targets."""
    model = fresh(folders, name).transformer
    add_lora(model, rank=RANK, alpha=RANK, target_modules=family_of(folders[name]).default_targets)
    randomize_lora_(model, seed=6, std=0.2)
    state = {prefix + k: v.to(torch.float16) for k, v in get_peft_model_state_dict(model).items()}
    safetensors.torch.save_file(state, str(path), {"software": '{"name": "ai-toolkit"}'})


@pytest.mark.parametrize(("name", "prefix"), [("tiny-flux", "transformer."), ("tiny-qwenimage", "diffusion_model.")])
def test_ai_toolkit_files_match_diffusers(folders, inputs, tmp_path, name, prefix):
    path = tmp_path / "aitk.safetensors"
    ai_toolkit_file(folders, name, path, prefix)
    adapter = read_adapter(path)
    assert adapter.components() == ["transformer"] and {v.alpha for v in adapter.layers.values()} == {RANK}
    assert (
        adapter.describe()["family"] == FAMILY[name]
        and adapter.layers[next(iter(adapter.layers))].up.dtype == torch.float16
    )
    loaded, attached = fresh(folders, name), fresh(folders, name)
    loaded.load_lora_weights(path)
    attach_adapter(attached.transformer, adapter)
    want = predict(folders, inputs, name, loaded.transformer)
    assert_rel_close(predict(folders, inputs, name, attached.transformer), want, 1e-5, f"ai-toolkit {name}")
    assert not torch.allclose(want, predict(folders, inputs, name, fresh(folders, name).transformer), atol=1e-4)


def test_diffusion_model_prefix_and_bare_keys_read_as_the_transformer(folders, tmp_path):
    """ai-toolkit's ``diffusion_model.`` on a Flux LoRA, and a transformer's ``save_lora_adapter`` keys without
    prefix, read as the same transformer layers as the ``transformer.`` file."""
    ai_toolkit_file(folders, "tiny-flux", tmp_path / "t.safetensors", "transformer.")
    ai_toolkit_file(folders, "tiny-flux", tmp_path / "d.safetensors", "diffusion_model.")
    ai_toolkit_file(folders, "tiny-flux", tmp_path / "b.safetensors", "")
    want = read_adapter(tmp_path / "t.safetensors")
    assert_same_adapter(read_adapter(tmp_path / "d.safetensors"), want)
    assert_same_adapter(read_adapter(tmp_path / "b.safetensors"), want)


def test_comfyui_bfl_names_read_like_kohya(tmp_path):
    """ComfyUI's FLUX.1 names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``) read as the
    same layers as sd-scripts' ``lora_unet_double_blocks_0_img_attn_qkv`` file."""
    tensors = kohya_file(tmp_path / "kohya.safetensors", {**KOHYA_DIFFUSERS_LOADS, **KOHYA_REST}, seed=7)
    comfy = {}
    for key, value in tensors.items():
        stem, _, role = key.removeprefix("lora_unet_").partition(".")
        dotted = {
            "double_blocks_0_": "double_blocks.0.", "single_blocks_0_": "single_blocks.0.",
        }  # fmt: skip
        for flat, dot in dotted.items():
            stem = stem.replace(flat, dot)
        for flat in ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "modulation"):
            stem = stem.replace(f"{flat}_", f"{flat}.")
        stem = stem.replace("in_in_layer", "in.in_layer").replace("in_out_layer", "in.out_layer")
        stem = stem.replace("final_layer_linear", "final_layer.linear")
        stem = stem.replace("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1")
        comfy[f"diffusion_model.{stem}.{role}"] = value
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in comfy
    safetensors.torch.save_file(comfy, str(tmp_path / "comfy.safetensors"))
    assert_same_adapter(read_adapter(tmp_path / "comfy.safetensors"), read_adapter(tmp_path / "kohya.safetensors"))


@pytest.mark.parametrize("name", list(PIPELINES))
def test_kohya_rule_inverts_every_transformer_module_name(folders, name):
    """musubi-tuner's kohya files keep diffusers' names (lora_unet_transformer_blocks_0_attn_to_q): the rule
    maps every Linear/Conv2d name of each transformer back."""
    for module_name, m in fresh(folders, name).transformer.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            assert kohya_to_path(module_name.replace(".", "_")) == module_name


# --------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def flux_adapter_file(folders, tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "flux-lora.safetensors"
    write_adapter(random_adapter({"transformer": fresh(folders, "tiny-flux").transformer}, seed=8), path)
    return path


def test_adapter_for_the_other_denoiser_is_refused_in_one_line(folders, tiny, flux_adapter_file, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    with pytest.raises(CatfastError) as err:
        attach_adapter(unet, read_adapter(flux_adapter_file))
    message = str(err.value)
    assert "\n" not in message and "flux-lora.safetensors" in message
    assert "transformer (flux)" in message and "unet (UNet2DConditionModel)" in message
    assert not getattr(unet, "peft_config", None)  # untouched

    write_adapter(random_adapter({"unet": unet}, leaves=("to_q",)), tmp_path / "unet-lora.safetensors")
    transformer = fresh(folders, "tiny-flux").transformer
    with pytest.raises(CatfastError) as err:
        attach_adapter(transformer, read_adapter(tmp_path / "unet-lora.safetensors"))
    message = str(err.value)
    assert "\n" not in message and "a unet" in message and "transformer (FluxTransformer2DModel)" in message


def test_kohya_write_of_a_transformer_adapter_is_refused(flux_adapter_file, tmp_path):
    with pytest.raises(CatfastError, match="kohya files for UNet and text-encoder adapters only") as err:
        write_adapter(read_adapter(flux_adapter_file), tmp_path / "k.safetensors", "kohya")
    assert "\n" not in str(err.value) and not (tmp_path / "k.safetensors").exists()


def test_kohya_flux_attention_only_names_the_family(tmp_path):
    """A kohya FLUX.1 file on the double blocks' qkv only: its diffusers names (to_q, ...) are every family's,
    its BFL names FLUX.1's alone."""
    kohya_file(tmp_path / "qkv.safetensors", {"double_blocks_0_img_attn_qkv": (3 * D, D)}, seed=9)
    r = CliRunner().invoke(main, ["adapter", "info", str(tmp_path / "qkv.safetensors")])
    assert r.exit_code == 0 and "components:  transformer (family flux)" in r.output, r.output


def test_cli_info_names_component_and_family(flux_adapter_file):
    r = CliRunner().invoke(main, ["adapter", "info", str(flux_adapter_file)])
    assert r.exit_code == 0, r.output
    assert "components:  transformer (family flux)" in r.output and "Traceback" not in r.output
    info = json.loads(CliRunner().invoke(main, ["adapter", "info", "--json", str(flux_adapter_file)]).output)
    assert info["components"] == ["transformer"] and info["family"] == "flux"
    assert "single_transformer_blocks.0.attn.to_q" not in info["targets"] and "proj_mlp" in info["targets"]


def test_lora_layer_split_keeps_alpha_not_folded():
    """The split parts of a fused qkv share the alpha and the rank of the kohya layer (no alpha folded)."""
    from catfast.adapters.kohya_names import split_flux_layer

    layer = LoraLayer(down=torch.randn(4, 8), up=torch.randn(24, 4), alpha=2.0)
    parts = split_flux_layer("double_blocks.3.txt_attn.qkv", layer)
    assert list(parts) == [f"transformer_blocks.3.attn.add_{c}_proj" for c in "qkv"]
    assert all(p.alpha == 2.0 and torch.equal(p.down, layer.down) for p in parts.values())
    assert torch.equal(torch.cat([p.up for p in parts.values()]), layer.up)
