"""The DiT demo base (catfast/demo/assets/dit_model, a Flux-style FluxPipeline) and `catfast demo --model dit`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from catfast.shipped import ASSETS, check_assets, dit_model_path, model_path


def test_dit_base_is_a_small_flux_pipeline_reusing_the_unet_demo_parts():
    check_assets()
    folder = dit_model_path()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"][1] == "FluxTransformer2DModel"
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["num_layers"] >= 1 and config["num_single_layers"] >= 1  # double- and single-stream blocks
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 10 * 2**20  # <= 10 MB in fp16
    # the UNet demo's parts, byte for byte: its VAE and tokenizer, and its text encoder of the first three stages
    # (the UNet demo trained its weights on in the two striped stages: same config, other weights)
    for name in ("vae", "text_encoder", "tokenizer"):
        for mine in (folder / name).iterdir():
            same = mine.read_bytes() == (model_path() / name / mine.name).read_bytes()
            assert same or (name, mine.name) == ("text_encoder", "model.safetensors"), mine
    manifest = json.loads((ASSETS / "MANIFEST.json").read_text())
    assert "dit_model/transformer/diffusion_pytorch_model.safetensors" in manifest
    info = json.loads((folder / "pretrain.json").read_text())
    assert info["command"].startswith("python -m catfast.demo.dit_pretrain") and info["seconds"] <= 90 * 60


def test_dit_base_encodes_16_text_tokens_and_matches_diffusers_pipeline():
    """The flux family reads the demo base's short T5 length (tiny-flux keeps FLUX.1's 512), and catfast's flow
    sampler gives what diffusers' own FluxPipeline gives on this folder."""
    from catfast.eval.flow_sampler import sample_flow_latents
    from catfast.integrations.factory_demo_dit import TEXT_LENGTH, load_flux
    from catfast.integrations.factory_dit import build_pipeline
    from catfast.integrations.families.flux import FAMILY

    pipe = load_flux(dit_model_path())
    assert FAMILY.encode_prompt(pipe, ["a red star"])["prompt_embeds"].shape[1] == TEXT_LENGTH == 16
    assert FAMILY.text_length(build_pipeline("tiny-flux")) == 512
    prompt, steps = "a red star on a blue background", 4
    ours = sample_flow_latents(pipe, [prompt], adapters=[None], seeds=[3], steps=steps, height=32, width=32)
    theirs = pipe(prompt, num_inference_steps=steps, height=32, width=32, max_sequence_length=TEXT_LENGTH,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images  # fmt: skip
    theirs = pipe._unpack_latents(theirs, 32, 32, pipe.vae_scale_factor)  # noqa: SLF001 - diffusers' own unpack
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), (ours - theirs).abs().max()


def test_dit_base_follows_words():
    """The word-following figures recorded in pretrain.json (and the README) reproduce: 48 full captions, read
    back by the shipped attribute encoder; colour and background well above chance (1/9, 1/6), shape above it
    (1/5)."""
    from catfast.demo.dit_pretrain import measure_words
    from catfast.demo.encoder import load_encoder
    from catfast.integrations.factory_demo_dit import load_flux
    from catfast.shipped import encoder_path

    recorded = json.loads((dit_model_path() / "pretrain.json").read_text())["words"]
    hits = measure_words(load_flux(dit_model_path()), load_encoder(encoder_path()), n=recorded["n"])
    for head in ("shape", "color", "background"):  # two pictures of 48 of slack: fp32 sums may round otherwise
        assert abs(hits[head] - recorded[head]) <= 2 / 48, (head, hits, recorded)
    assert hits["shape"] >= 0.35 and hits["color"] >= 0.8 and hits["background"] >= 0.9, hits


def test_dit_demo_end_to_end_small(tmp_path):
    """`run_demo(model_kind="dit")` at a tiny budget: two trainings through the DiT trainer, one flow-sampler
    run over both adapters, scores, grid and results.json."""
    from catfast.demo.run import demo_summary, format_table, run_demo

    result = run_demo(tmp_path / "demo", steps=2, seeds=2, prompts=("a star",), sample_steps=2, progress=False,
                      model_kind="dit")  # fmt: skip
    for method in ("plain", "cat"):
        for key in ("preservation", "identity", "identity_accuracy", "diversity", "kps"):
            assert 0 <= result[method][key] <= 1
        adapter = tmp_path / "demo" / method / "adapter.safetensors"
        assert adapter.is_file()
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as f:  # a DiT adapter: transformer keys, both block kinds
            keys = list(f.keys())
        assert all(k.startswith("transformer.") for k in keys)
        assert any(".single_transformer_blocks." in k for k in keys)
        assert any(".transformer_blocks." in k for k in keys)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["settings"]["model"] == "dit" and saved["settings"]["sample"]["guidance"] is None
    assert saved["settings"]["train"]["rank"] == 16 and saved["settings"]["train"]["resolution"] == 32
    # the trainings differ only in the CAT term: so do their adapters
    from safetensors.torch import load_file

    plain, cat = (load_file(tmp_path / "demo" / m / "adapter.safetensors") for m in ("plain", "cat"))
    assert plain.keys() == cat.keys() and any(not torch.equal(plain[k], cat[k]) for k in plain)
    assert "CAT" in format_table(result) and demo_summary(result)["grid"].endswith("grid.png")


def _demo(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "catfast.cli", "demo", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "transformer"), "Invalid value for '--model'"),
        (("--model", "dit", "--compare", "cat"), "--compare runs on the UNet demo base only"),
    ],
)
def test_dit_demo_bad_input_is_one_line(tmp_path, args, message):
    r = _demo("--out", str(tmp_path / "out"), *args, cwd=tmp_path)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_demo_model_is_refused_before_any_work(tmp_path):
    from catfast.demo.run import prepare
    from catfast.errors import CatfastError

    with pytest.raises(CatfastError, match="unknown demo model 'sd3'; choose one of unet, dit"):
        prepare(tmp_path / "out", False, None, "sd3")
    assert not (tmp_path / "out").exists()


def test_serve_demo_dit_answers_with_its_three_shipped_adapters():
    """`catfast serve --base demo-dit`: the shipped DiT base at its 32 px, its three adapters registered; a request
    on an adapter, a stacked one and a base one in one batch, each equal to it alone (pixels within 1)."""
    from catfast.demo.adapters import CONCEPTS
    from catfast.serve.cli import build_app
    from catfast.serve.requests import GenerationRequest

    engine, _ = build_app("demo-dit", device="cpu")
    try:
        assert engine.native_size == 32 and sorted(a.name for a in engine.adapters()) == sorted(CONCEPTS)

        def submit(adapters):
            return engine.submit(GenerationRequest("sks, a star", adapters=adapters, steps=3, seed=2))

        asks = [{"striped-star": 1.0}, {"tiger-ball": 0.5, "toy-box": 0.5}, {}]
        with engine._lock:  # noqa: SLF001 - hold the step thread so that the three share a batch
            mixed = [submit(a) for a in asks]
        for handle, adapters in zip(mixed, asks):
            got = handle.result(120)
            alone = submit(adapters).result(120)
            assert got[0].size == (32, 32)
            diff = np.abs(np.asarray(got[0], dtype=float) - np.asarray(alone[0], dtype=float)).max()
            assert diff <= 1, (adapters, diff)  # PNG rounding of equal latents
        images = [np.asarray(h.result(1)[0], dtype=float) for h in mixed]
        assert np.abs(images[0] - images[2]).max() > 10  # the adapter changes the picture
    finally:
        engine.close()
