"""Base models: random-weight factories, complete diffusers folders, the offline tokenizer, and loaders
for folders and single UNet files (diffusers and LDM naming, pickle policy, bad input). Tiny models only;
sd15/sdxl are checked on the meta device (shapes and parameter counts, no memory)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/transformers import huggingface_hub

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from catfast.errors import ModelLoadError  # noqa: E402
from catfast.integrations.factory import build_base, build_unet, init_model_folder, unet_config  # noqa: E402
from catfast.integrations.models import (  # noqa: E402
    encode_prompt,
    load_base,
    resolve_base,
)
from catfast.integrations.tokenizer import build_tokenizer, vocab_size  # noqa: E402
from catfast.integrations.weight_files import load_unet_file  # noqa: E402
from catfast.testing import unet_to_ldm  # noqa: E402

CAPTIONS = ["sks, a cat statue on a carpet", "a photo of a dog"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Offline even when another test module imported huggingface_hub before HF_HUB_OFFLINE was set."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return init_model_folder("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tiny_xl_dir(tmp_path_factory) -> Path:
    return init_model_folder("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


def _unet_out(unet, cond, seed=0):
    """UNet prediction on fixed random latents at two timesteps; cond as encode_prompt returns it."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    z = torch.randn(len(CAPTIONS), 4, size, size, generator=g)
    kwargs = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
    with torch.no_grad():
        return unet(z, torch.tensor([10, 700]), **kwargs).sample


# ---------------------------------------------------------------------------------------------------------
# folders: catfast and diffusers both load what init_model_folder writes


def test_tiny_folder_round_trip(tiny_dir):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    names = {p.name for p in tiny_dir.iterdir()}
    assert names == {"model_index.json", "unet", "text_encoder", "tokenizer", "vae", "scheduler"}
    assert (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    base = load_base(tiny_dir)
    assert not base.is_sdxl and base.path == tiny_dir
    assert isinstance(base.scheduler, DDPMScheduler)
    sched = base.scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        1000,
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert sched.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in base.unet.parameters())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    ours = encode_prompt(base, CAPTIONS)
    theirs, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
    assert ours.shape == (2, 77, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    expected = _unet_out(build_unet("tiny", seed=0), ours)
    torch.testing.assert_close(_unet_out(base.unet, ours), expected, rtol=0, atol=0)
    torch.testing.assert_close(_unet_out(pipe.unet, ours), expected, rtol=0, atol=0)
    # diffusers can run its whole pipeline on it (tokenizer, text encoder, UNet, scheduler, VAE)
    image = pipe("a cat", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_tiny_sdxl_folder_round_trip(tiny_xl_dir):
    from diffusers import StableDiffusionXLPipeline

    assert {"text_encoder_2", "tokenizer_2"} <= {p.name for p in tiny_xl_dir.iterdir()}
    base = load_base(tiny_xl_dir)
    assert base.is_sdxl
    cond = encode_prompt(base, CAPTIONS)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir, local_files_only=True)
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)
    expected = _unet_out(build_unet("tiny-sdxl", seed=0), cond)
    torch.testing.assert_close(_unet_out(base.unet, cond), expected, rtol=0, atol=0)
    latents = pipe("a cat", num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)


def test_init_refuses_non_empty_target_unless_overwrite(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not empty") as err:
        init_model_folder("tiny", target)
    assert str(target) in str(err.value)
    assert (target / "keep.txt").read_text() == "mine"
    init_model_folder("tiny", target, seed=3, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # neither the temp nor the old folder is left
    base = load_base(target)
    ref = build_unet("tiny", seed=3)
    torch.testing.assert_close(base.unet.conv_in.weight, ref.conv_in.weight, rtol=0, atol=0)


def test_encode_prompt_tiny_shapes():
    base = build_base("tiny")
    cond = encode_prompt(base, CAPTIONS + ["a red car"])
    assert cond.shape == (3, 77, 32) and cond.dtype == torch.float32
    # the conditioning depends on the caption: trigger vs stripped caption differ
    pair = encode_prompt(base, ["sks, a cat", "a cat"])
    assert not torch.allclose(pair[0], pair[1])
    with pytest.raises(TypeError):
        encode_prompt(base, "a cat")


# ---------------------------------------------------------------------------------------------------------
# shapes of the named models


def test_small_model_sizes():
    base = build_base("small")
    unet_params = sum(p.numel() for p in base.unet.parameters())
    assert 5e6 < unet_params < 30e6  # a CPU-benchmark UNet: much smaller than SD1.5, much larger than tiny
    assert base.text_encoder.config.hidden_size == base.unet.config.cross_attention_dim == 256
    assert base.text_encoder.config.vocab_size == len(base.tokenizer) == vocab_size()
    assert base.vae_scale_factor == 8
    assert 1e5 < sum(p.numel() for p in build_unet("tiny").parameters()) < 1e6


@pytest.mark.parametrize("name, unet_params", [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_real_shapes_on_meta(name, unet_params):
    """sd15/sdxl at full size on the meta device: parameter counts, and the text conditioning fits the UNet."""
    with torch.device("meta"):
        base = build_base(name)
    assert sum(p.numel() for p in base.unet.parameters()) == unet_params
    assert base.vae.config.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025}[name]
    assert base.vae_scale_factor == 8
    cond = encode_prompt(base, CAPTIONS)
    if name == "sdxl":
        assert cond["encoder_hidden_states"].shape == (2, 77, 2048)  # CLIP-L 768 + bigG 1280
        assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
        assert base.text_encoder_2.config.num_hidden_layers == 32
    else:
        assert cond.shape == (2, 77, 768)
    size = base.unet.config.sample_size
    z = torch.empty(2, 4, size, size, device="meta")
    kwargs = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
    assert base.unet(z, torch.tensor([1, 2], device="meta"), **kwargs).sample.shape == z.shape


# ---------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_offline(tiny_dir, tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer()
    enc = tok(CAPTIONS[0], padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = enc.input_ids
    assert tok.model_max_length == 77 and len(ids) == 77
    words = tok.convert_ids_to_tokens(ids[:9])
    assert words == [
        "<|startoftext|>",
        "sks</w>",
        ",</w>",
        "a</w>",
        "cat</w>",
        "statue</w>",
        "on</w>",
        "a</w>",
        "carpet</w>",
    ]
    assert ids[9:] == [tok.eos_token_id] * 68  # end of text, then padding with end of text
    assert tok("zyxwvut Zürich").input_ids[-1] == tok.eos_token_id  # unknown words still encode (bytes)
    assert tok(" ".join(["cat"] * 200), truncation=True).input_ids.__len__() == 77

    saved = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer", local_files_only=True)
    assert saved(CAPTIONS).input_ids == tok(CAPTIONS).input_ids and saved.model_max_length == 77
    classic = tmp_path / "classic"  # only the classic files: vocab.json + merges.txt (+ tokenizer_config.json)
    classic.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_dir / "tokenizer" / name, classic / name)
    assert CLIPTokenizer.from_pretrained(classic, local_files_only=True)(CAPTIONS).input_ids == tok(CAPTIONS).input_ids


# ---------------------------------------------------------------------------------------------------------
# single UNet files


def test_single_file_diffusers_naming(tiny_dir, tmp_path):
    unet = build_unet("tiny", seed=7)
    file = tmp_path / "unet.safetensors"
    save_file(unet.state_dict(), file)
    cond = torch.randn(2, 77, 32)
    expected = _unet_out(unet, cond)
    for config in (tiny_dir, tiny_dir / "unet", tiny_dir / "unet" / "config.json", unet_config("tiny")):
        torch.testing.assert_close(_unet_out(load_unet_file(file, config), cond), expected, rtol=0, atol=0)
    half = load_unet_file(file, tiny_dir, dtype=torch.float16)
    assert half.conv_in.weight.dtype == torch.float16

    base = resolve_base(file, config=tiny_dir)  # --base FILE --config FOLDER
    assert base.unet_file == file and base.path == tiny_dir
    torch.testing.assert_close(_unet_out(base.unet, cond), expected, rtol=0, atol=0)
    assert resolve_base(tiny_dir).unet_file is None


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_single_file_ldm_naming(name, tmp_path):
    cfg = unet_config(name)
    unet = build_unet(name, seed=5)
    ldm = unet_to_ldm(unet.state_dict(), cfg)
    assert all(".down_blocks." not in k and ".up_blocks." not in k for k in ldm)
    # a full SD checkpoint also holds the VAE and text encoder: those keys are ignored
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    ldm["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(8)
    file = tmp_path / "model.safetensors"
    save_file(ldm, file)
    loaded = load_unet_file(file, cfg)
    assert loaded.state_dict().keys() == unet.state_dict().keys()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_pickle_refused_then_allowed(tmp_path):
    unet = build_unet("tiny", seed=2)
    ckpt = tmp_path / "model.ckpt"  # LDM-style: {"state_dict": {...}, "global_step": n}
    torch.save({"state_dict": unet_to_ldm(unet.state_dict(), unet_config("tiny")), "global_step": 10}, ckpt)
    with pytest.raises(ModelLoadError, match="refusing to load a pickle") as err:
        load_unet_file(ckpt, unet_config("tiny"))
    assert str(ckpt) in str(err.value) and "allow_pickle=True" in str(err.value)
    loaded = load_unet_file(ckpt, unet_config("tiny"), allow_pickle=True)
    torch.testing.assert_close(loaded.conv_out.weight, unet.conv_out.weight, rtol=0, atol=0)

    plain = tmp_path / "unet.bin"  # diffusers naming, bare state dict
    torch.save(unet.state_dict(), plain)
    torch.testing.assert_close(
        load_unet_file(plain, unet_config("tiny"), allow_pickle=True).conv_in.bias, unet.conv_in.bias, rtol=0, atol=0
    )
    # weights_only=True still refuses pickles of arbitrary objects
    evil = tmp_path / "evil.pt"
    torch.save({"obj": ModelLoadError("x")}, evil)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_unet_file(evil, unet_config("tiny"), allow_pickle=True)


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear ModelLoadError naming the path


def test_bad_folders(tiny_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="no such folder") as err:
        load_base(missing)
    assert str(missing) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json is missing") as err:
        load_base(empty)
    assert str(empty) in str(err.value)

    no_vae = tmp_path / "no_vae"
    shutil.copytree(tiny_dir, no_vae)
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(ModelLoadError, match="component 'vae' is missing") as err:
        load_base(no_vae)
    assert str(no_vae) in str(err.value)

    unnamed = tmp_path / "unnamed"
    shutil.copytree(tiny_dir, unnamed)
    index = json.loads((unnamed / "model_index.json").read_text())
    del index["text_encoder"]
    (unnamed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="names no 'text_encoder'"):
        load_base(unnamed)

    with pytest.raises(ModelLoadError, match="UNet weights only .* pass --base-config DIR"):
        resolve_base(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve_base(missing)


def test_corrupt_weights(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError) as err:
        load_base(broken)
    assert str(broken / "unet") in str(err.value) and "unet" in str(err.value)
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as err:
        load_unet_file(weights, broken)
    assert str(weights) in str(err.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_unet_file(garbage, unet_config("tiny"))


def test_unet_file_that_does_not_fit(tiny_dir, tmp_path):
    state = build_unet("tiny").state_dict()
    del state["conv_norm_out.weight"], state["mid_block.resnets.0.conv1.bias"]
    state["extra.layer.weight"] = torch.zeros(3)
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    file = tmp_path / "wrong.safetensors"
    save_file(state, file)
    with pytest.raises(ModelLoadError) as err:
        load_unet_file(file, tiny_dir)
    msg = str(err.value)
    assert str(file) in msg and str(tiny_dir / "unet" / "config.json") in msg
    assert "2 missing keys" in msg and "conv_norm_out.weight" in msg and "mid_block.resnets.0.conv1.bias" in msg
    assert "1 unexpected keys" in msg and "extra.layer.weight" in msg
    assert "conv_in.weight: file (32, 4, 1, 1) vs model (32, 4, 3, 3)" in msg

    # weights of another model (small) against the tiny config
    other = tmp_path / "small.safetensors"
    save_file(build_unet("small").state_dict(), other)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_unet_file(other, tiny_dir)
    with pytest.raises(ModelLoadError, match="unknown weights format"):
        load_unet_file(tiny_dir / "unet" / "config.json", tiny_dir)
    with pytest.raises(ModelLoadError, match="no UNet config"):
        load_unet_file(file, tmp_path)


def test_hub_id_from_the_local_hub_cache_and_a_clear_error_offline(tiny_dir, tmp_path):
    """`--base owner/name`: found in the hub cache offline (the layout huggingface_hub writes), and a
    one-line ModelLoadError for an id the cache does not hold."""
    import subprocess
    import sys

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-sd"
    shutil.copytree(tiny_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "import sys\nfrom catfast.integrations.models import resolve_base\nfrom catfast.errors import ModelLoadError\n"
        "base = resolve_base('acme/tiny-sd')\nprint(type(base.unet).__name__, base.path)\n"
        "try:\n    resolve_base('acme/not-cached')\nexcept ModelLoadError as e:\n    print('ERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded, error = r.stdout.strip().splitlines()[-2:]
    assert loaded.startswith("UNet2DConditionModel") and revision in loaded
    assert error.startswith("ERROR acme/not-cached: not a local file or folder") and "Hugging Face Hub" in error
