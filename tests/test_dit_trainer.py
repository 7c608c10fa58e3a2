"""`catfast train --base <diffusers DiT pipeline folder>` (train/flow_trainer.py) on each tiny DiT pipeline: a few
CAT steps with finite losses, the text encoders freed before the loop, an adapter that the family pipeline's own
``load_lora_weights`` loads with its rank and alpha and that changes the prediction; resume after an
interruption gives the uninterrupted run's adapter bit for bit; what the DiT path does not build is refused in one
line; Qwen-Image captions of different lengths batch with the pipeline's padding and mask."""

import json
import logging
import shutil

import pytest
import torch
from click.testing import CliRunner
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from catfast.cli import main
from catfast.errors import CatfastError
from catfast.integrations.factory_dit import init_dit_folder
from catfast.integrations.families import family_of
from catfast.testing import assert_rel_close, make_data
from catfast.train.config import TrainConfig
from catfast.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = {"tiny-flux": FluxPipeline, "tiny-sd3": StableDiffusion3Pipeline, "tiny-qwenimage": QwenImagePipeline}
# LoRA layers on a family's default targets whose output never reaches the prediction: SD3's last block drops its
# text stream (context_pre_only), so the text query there gets no gradient (diffusers' SD3 script trains it too)
NO_GRADIENT = {"tiny-sd3": {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dits")
    return {name: init_dit_folder(name, root / name) for name in PIPELINES}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = make_data(tmp_path_factory.mktemp("data") / "stars", n=2)
    (folder / "img1.txt").write_text("sks, a large red star on a plain blue background")  # a longer caption
    return folder


def config(base, data, out, **overrides) -> TrainConfig:
    values = dict(base=str(base), data=str(data), trigger="sks", out=str(out), steps=3, rank=4, alpha=2.0,
                  lr=3e-3, checkpoint_every=0, resolution=32)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def freed_line(caplog) -> str:
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("text encoders and VAE freed"))


@pytest.mark.parametrize("name", list(PIPELINES))
def test_train_loads_in_the_family_pipeline_and_changes_the_prediction(folders, data, tmp_path, caplog, name):
    caplog.set_level(logging.INFO, logger="catfast.train")
    result = train(config(folders[name], data, tmp_path / "out"), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["ldm"], r["cat"]])).all() for r in lines)
    assert lines[0]["mode"] == result.mode and "mode_reason" in lines[0]
    # the text encoders and the VAE were dropped and collected before the first step
    assert freed_line(caplog).endswith("(still referenced: none)") and "text_encoder" in freed_line(caplog)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["targets"] == list(family_of(folders[name])
                                                                                          .default_targets)  # fmt: skip

    path = result.adapters["sks"]
    tensors = load_file(path)
    assert tensors and all(k.startswith("transformer.") for k in tensors)
    ups = {k: v for k, v in tensors.items() if ".lora_B." in k}
    untrained = {k for k, v in ups.items() if not v.abs().sum() > 0}  # B starts at zero
    assert ups and untrained <= NO_GRADIENT.get(name, set())
    for key, value in result.lora.items():  # the file holds the trained parameters
        assert torch.equal(tensors["transformer." + key.replace(".default.", ".")], value)

    pipe = PIPELINES[name].from_pretrained(folders[name], local_files_only=True)
    pipe.load_lora_weights(path)
    (adapter_config,) = pipe.transformer.peft_config.values()
    assert (adapter_config.r, adapter_config.lora_alpha) == (4, 2)  # alpha != rank survives the file
    family = family_of(pipe)
    g = torch.Generator().manual_seed(0)
    latents, sigmas = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.7])
    with torch.no_grad():
        cond = family.encode_prompt(pipe, ["sks, a star"])
        cond = {k: v for k, v in cond.items() if v is not None}
        loaded = family.predict(pipe.transformer, latents, sigmas, cond)
        pipe.transformer.disable_adapters()
        base = family.predict(pipe.transformer, latents, sigmas, cond)
    assert not torch.allclose(loaded, base, atol=1e-5)  # the adapter changes the prediction


def test_resume_after_an_interruption_gives_the_same_adapter_bit_for_bit(folders, data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="catfast.train")
    base = folders["tiny-qwenimage"]
    whole = train(config(base, data, tmp_path / "whole", steps=4, checkpoint_every=2), progress=False)
    # a run killed after step 3, before its checkpoint: step-0000002 is the newest complete one
    cut = tmp_path / "cut"
    train(config(base, data, cut, steps=3, checkpoint_every=2), progress=False)
    shutil.rmtree(cut / "checkpoints" / "step-0000003")
    (cut / "adapter.safetensors").unlink()
    caplog.clear()
    resumed = train(config(base, data, cut, steps=4, checkpoint_every=2), resume=True, progress=False)
    assert resumed.start_step == 2
    assert "freed before the first step: vae (" in freed_line(caplog)  # every entry cached: no text encoder loaded
    a, b = load_file(whole.adapters["sks"]), load_file(resumed.adapters["sks"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("whole", "cut")]
    assert [json.loads(x)["loss"] for x in metrics[0]] == [json.loads(x)["loss"] for x in metrics[1]]
    # the checkpoint carries the adapter as of its step, the same file, written inside the atomic checkpoint
    carried = load_file(cut / "checkpoints" / "step-0000004" / "lora.safetensors")
    assert carried.keys() == b.keys() and all(torch.equal(carried[k], b[k]) for k in b)


def test_what_the_dit_path_does_not_build_is_refused_in_one_line(folders, data, tmp_path):
    base = folders["tiny-sd3"]
    for overrides, option in (
        (dict(cuda_graphs=True), "--cuda-graphs"),
        (dict(bank=str(tmp_path), buckets=True), "--bank with --buckets"),
        (dict(snr_gamma=5.0), "--snr-gamma"),
        (dict(sample_every=1), "--sample-every"),
        (dict(format="kohya"), "--format kohya"),
    ):
        with pytest.raises(CatfastError) as e:
            train(config(base, data, tmp_path / "out", **overrides), progress=False)
        assert option in str(e.value) and "DiT bases (sd3)" in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "out" / "config.json").exists()  # refused before OUT changes


def test_cli_trains_a_dit_with_its_recipe_and_help_names_dit_bases(folders, data, tmp_path):
    assert "DiT" in CliRunner().invoke(main, ["train", "-h"]).output
    out = tmp_path / "out"
    args = ["train", "--base", folders["tiny-flux"], "--data", data, "--trigger", "sks", "--out", out, "--steps", "2"]
    result = CliRunner().invoke(main, [*map(str, args), "--resolution", "32", "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "rank 16 (alpha 16)" in result.output and "defaults from the DiT recipe (flux): rank 16" in result.output
    assert f"wrote adapter to {out / 'adapter.safetensors'}" in result.output


def test_qwen_captions_of_different_lengths_batch_with_the_pipelines_padding(folders, data, tmp_path):
    """A batch of two captions of different lengths: zero-padded with a mask, each row predicts what it
    predicts alone."""
    from catfast.train.flow_cache import build_flow_cache
    from catfast.train.run_parts import scan_examples

    base = folders["tiny-qwenimage"]
    c = config(base, data, tmp_path / "out", batch_size=2, steps=1, resolution=32)
    c.validate()
    family = family_of(base)
    examples = scan_examples(c)
    dataset, _ = build_flow_cache(base, family, examples, c, tmp_path / "cache", torch.device("cpu"), progress=False)
    latents, cond, _ = dataset.batch([(0, 0), (1, 0)], "cpu", torch.float32)
    assert cond["prompt_embeds_mask"].shape == cond["prompt_embeds"].shape[:2]
    assert not cond["prompt_embeds_mask"].all()  # one row is padded
    model = QwenImagePipeline.from_pretrained(base, local_files_only=True).transformer
    sigmas = torch.tensor([0.6, 0.6])
    with torch.no_grad():
        both = family.predict(model, latents, sigmas, cond)
        for i in range(2):
            alone = {"prompt_embeds": dataset.entries[i].cond["prompt_embeds"][None]}
            assert_rel_close(both[i : i + 1], family.predict(model, latents[i : i + 1], sigmas[:1], alone), 1e-4,
                             f"row {i}")  # fmt: skip
    assert train(c, progress=False).last["loss"] > 0  # and the trainer runs such batches
