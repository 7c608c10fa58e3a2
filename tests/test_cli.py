"""The `catfast` command end to end: the README's quick-start path through the real console script,
adapter info/convert on a file diffusers wrote, and one-line errors for bad input."""

import json
import subprocess

import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from catfast.cli import main
from catfast.integrations.factory import build_unet
from catfast.testing import assert_rel_close, randomize_lora_


def catfast(*args, check=True):
    r = subprocess.run(["catfast", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"catfast {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    catfast("models", "init", "tiny", folder)
    return folder


@torch.no_grad()
def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    return unet(x, torch.tensor([500]), c).sample


def test_quick_start_path_and_diffusers_loads_both_formats(tiny_folder, tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    kohya = tmp_path / "adapter_kohya.safetensors"
    r = catfast(
        "cat-step",
        "--base",
        tiny_folder,
        "--steps",
        "3",
        "--rank",
        "4",
        "--alpha",
        "2",
        "--lr",
        "1e-2",
        "--out",
        adapter,
    )
    assert "step 3: loss" in r.stdout
    catfast("adapter", "convert", adapter, kohya, "--to", "kohya")
    infos = [json.loads(catfast("adapter", "info", f, "--json").stdout) for f in (adapter, kohya)]
    assert [i["format"] for i in infos] == ["diffusers", "kohya"]
    for info in infos:
        assert set(info["ranks"].values()) == {4} and set(info["alphas"].values()) == {2.0}
        assert info["targets"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert infos[0]["num_parameters"] == infos[1]["num_parameters"] > 0

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    base_out = _unet_out(pipe.unet)
    outs = []
    for name, f in (("a", adapter), ("k", kohya)):
        pipe.load_lora_weights(str(f), adapter_name=name)
        pipe.set_adapters([name])
        outs.append(_unet_out(pipe.unet))
    assert (outs[0] - base_out).abs().max() > 1e-4  # the trained adapter really changes the UNet
    assert_rel_close(outs[1], outs[0], 1e-5, "kohya vs diffusers file in diffusers")


@pytest.fixture
def diffusers_written_file(tmp_path):
    """What diffusers' training scripts write: old `lora.down` keys via convert_state_dict_to_diffusers,
    with the peft config (alpha != rank) in the metadata."""
    unet = build_unet("tiny")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v", "proj_in"]))
    randomize_lora_(unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return tmp_path / "pytorch_lora_weights.safetensors"


def test_info_and_convert_on_a_file_diffusers_wrote(diffusers_written_file, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["adapter", "info", str(diffusers_written_file)])
    assert r.exit_code == 0, r.output
    assert "format:      diffusers" in r.output
    assert "rank:        4" in r.output and "alpha:       6.0" in r.output
    assert "targets:     proj_in, to_q, to_v" in r.output
    out = tmp_path / "k.safetensors"
    r = runner.invoke(main, ["adapter", "convert", str(diffusers_written_file), str(out), "--to", "kohya"])
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(main, ["adapter", "info", str(out), "--json"]).output)
    assert info["format"] == "kohya" and set(info["alphas"].values()) == {6.0}


def test_bad_input_gives_one_line_errors_and_loses_nothing(diffusers_written_file, tmp_path):
    runner = CliRunner()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(diffusers_written_file.read_bytes()[:200])
    r = runner.invoke(main, ["adapter", "info", str(truncated)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and str(truncated) in r.output
    assert "Traceback" not in r.output

    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    r = runner.invoke(main, ["adapter", "convert", str(diffusers_written_file), str(existing), "--to", "kohya"])
    assert r.exit_code == 1 and "exists" in r.output and existing.read_bytes() == b"keep me"

    folder = tmp_path / "occupied"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    r = runner.invoke(main, ["models", "init", "tiny", str(folder)])
    assert r.exit_code == 1 and "overwrite" in r.output and (folder / "notes.txt").read_text() == "mine"

    r = runner.invoke(main, ["cat-step", "--base", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such folder" in r.output


def test_eval_kps_from_files(tiny_folder, tmp_path):
    """`catfast eval kps` on a trained adapter, a local (tiny, random) CLIP and a prompts file."""
    from catfast.eval.encoders import make_tiny_clip

    adapter = tmp_path / "adapter.safetensors"
    catfast("cat-step", "--base", tiny_folder, "--steps", "1", "--lr", "1e-2", "--out", adapter)
    clip = make_tiny_clip(tmp_path / "clip", seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star on a plain background\na dog in a field\n")
    grid = tmp_path / "kps.png"
    args = ("--base", tiny_folder, "--adapter", adapter, "--clip", clip, "--trigger", "sks", "--steps", "2")
    r = catfast("eval", "kps", *args, "--prompts", prompts, "--seeds", "2", "--grid", grid, "--json")
    total = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("preservation", "identity", "kps"):
        assert 0.0 <= total[key] <= 1.0, (key, total)
    assert grid.stat().st_size > 0
    table = catfast("eval", "kps", *args, "--prompts", prompts, "--seeds", "2").stdout
    assert "a dog in a field" in table and "kps" in table.lower()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    bad = catfast("eval", "kps", *args, "--prompts", empty, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and str(empty) in bad.stderr
