"""Issue 26, item 4: single-file bases as A1111 / civitai share them (SD1.5 and SDXL in the original key layout)
load everywhere --base is taken; the configs they need ship with catfast (offline); a UNet-only file's error
names --base-config. The files are written from the factories' models in the original layout (the inverse
of diffusers' own converters, `catfast.testing.original_checkpoint`). Failed before: `resolve_base` refused
every file without a config folder, `load_base` (serve, export) took folders only, and the error named --config."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from catfast.cli import main
from catfast.errors import ModelLoadError
from catfast.integrations.clip import make_tiny_clip
from catfast.integrations.factory import build_base, init_model_folder
from catfast.integrations.models import (
    components_from_state,
    encode_prompt,
    load_base,
    resolve_base,
)
from catfast.integrations.tokenizer import clip_tokenizer
from catfast.integrations.weight_files import single_file_kind
from catfast.testing import original_checkpoint
from catfast.train.checkpoint import base_identity

pytestmark = pytest.mark.usefixtures("one_thread")


def _single_file(tmp_path, name: str):
    """(folder, its configs without weights, the same model as one original-layout .safetensors file)."""
    folder = init_model_folder(name, tmp_path / name)
    configs = tmp_path / f"{name}-configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    file = tmp_path / f"{name}.safetensors"
    save_file(original_checkpoint(load_base(folder)), file)
    return folder, configs, file


@pytest.mark.parametrize("name, kind", [("tiny", "sd15"), ("tiny-sdxl", "sdxl")])
def test_a_whole_checkpoint_loads_every_component_from_the_file(name, kind, tmp_path):
    folder, configs, file = _single_file(tmp_path, name)
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        keys = list(f.keys())
    assert single_file_kind(keys) == kind
    assert not any(k.startswith(("unet.", "vae.", "down_blocks.")) for k in keys)  # the original layout
    ref, got = load_base(folder), resolve_base(file, config=configs)
    assert got.file == file and got.path is None and got.is_sdxl == (kind == "sdxl")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(ref, part)
        if want is None:
            continue
        have = getattr(got, part).state_dict()
        assert have.keys() == want.state_dict().keys(), part
        assert all(torch.equal(have[k], v) for k, v in want.state_dict().items()), part
    a, b = encode_prompt(ref, ["sks, a star"]), encode_prompt(got, ["sks, a star"])
    a, b = (a, b) if torch.is_tensor(a) else (a["encoder_hidden_states"], b["encoder_hidden_states"])
    assert torch.equal(a, b)
    # the resume identity follows the file's bytes (other weights at the same path: another identity)
    before = base_identity(got)
    save_file({k: v + 1 for k, v in original_checkpoint(ref).items()}, file)
    assert base_identity(resolve_base(file, config=configs)) != before


@pytest.mark.parametrize(
    "name, params",
    [
        ("sd15", dict(unet=859_520_964, vae=83_653_863, text_encoder=123_060_480)),
        ("sdxl", dict(unet=2_567_463_684, vae=83_653_863, text_encoder=123_060_480, text_encoder_2=694_659_840)),
    ],
)
def test_real_sd15_and_sdxl_checkpoints_fit_the_shipped_configs(name, params):
    """Every key and shape of a real-size checkpoint (the factories' sd15 / sdxl on the meta device, real CLIP's
    49,408-token embeddings) loads through the shipped configs, with no config folder given."""
    with torch.device("meta"):
        base = build_base(name)
    state = original_checkpoint(base)
    for key in [k for k in state if k.endswith("token_embedding.weight")]:
        state[key] = torch.empty(49408, state[key].shape[1], device="meta")
    kind = single_file_kind(state)
    assert kind == name
    loaded = components_from_state(state, kind)
    for part, count in params.items():
        assert sum(p.numel() for p in loaded[part].parameters()) == count, part
    assert loaded["vae"].config.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025}[name]
    assert len(loaded["tokenizer"]) == loaded["text_encoder"].config.vocab_size == 49408
    assert loaded["scheduler"].config.beta_schedule == "scaled_linear"
    if name == "sdxl":
        assert loaded["tokenizer_2"].pad_token == "!"


def test_the_shipped_tokenizer_is_real_clips():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token_id == 49407 and clip_tokenizer("!").pad_token_id == 0


def test_a_unet_only_file_names_base_config(tiny, data, tmp_path):
    unet = tmp_path / "unet.safetensors"
    save_file(load_base(tiny).unet.state_dict(), unet)
    r = CliRunner().invoke(main, ["train", "--base", str(unet), "--data", str(data), "--trigger", "sks", "--out",
                                  str(tmp_path / "run")])  # fmt: skip
    assert r.exit_code != 0
    assert "--base-config DIR" in r.output and "(--config)" not in r.output
    with pytest.raises(ModelLoadError, match="UNet weights only"):
        load_base(unet)  # serve and export too


def test_every_command_takes_a_single_file_base(data, tmp_path):
    _, configs, file = _single_file(tmp_path, "tiny")
    base = ["--base", file, "--base-config", configs]

    def run(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    run("train", *base, "--data", data, "--trigger", "sks", "--out", tmp_path / "run", "--steps", 2, "--no-progress",
        "--threads", 1, "--sample-every", 0, "--checkpoint-every", 0)  # fmt: skip
    adapter = tmp_path / "run" / "adapter.safetensors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n")
    clip = make_tiny_clip(tmp_path / "clip")
    out = run("eval", "kps", *base, "--adapter", adapter, "--prompts", prompts, "--clip", clip, "--trigger", "sks",
              "--seeds", 2, "--steps", 2, "--json")  # fmt: skip
    assert 0 < json.loads(next(line for line in out.splitlines() if line.startswith("{")))["kps"] <= 1
    run("export", "onnx", *base, "--adapter", adapter, "--out", tmp_path / "onnx")
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["base"] == str(file.absolute())

    from catfast.serve.cli import build_app

    engine, _ = build_app(str(file), base_config=str(configs), device="cpu")
    try:
        assert engine.base.file == file
        (image,) = engine.generate("a star", steps=2, seed=0)
        assert image.size == (32, 32)
    finally:
        engine.close()
