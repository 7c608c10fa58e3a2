"""ONNX export of the diffusion transformers (catfast/export/dit.py) and the DiT ORT runner (export/dit_runner.py)
on tiny-flux, tiny-sd3 and tiny-qwenimage, in real ONNX Runtime, with catfast's PyTorch paths as the oracle.

A LoRA on the family's default targets (random non-zero B, alpha != rank) is merged at scale 0.8, or fed as
graph inputs. Checks: the manifest (family, named inputs, packing, schedule); ORT on the runner's by-name feeds
equals ``family.predict`` of the merged fp32 model within the UNet export's tolerance (1e-4; measured ~3e-7);
the ORT runner's final latents equal ``sample_flow_latents`` for the same prompt, noise and steps (1e-3
relative: every step's transformer call differs from torch by ~3e-7 and 4 Euler steps add four such errors,
so 1e-3 leaves room while a wrong schedule, sign, packing or guidance is off by > 1e-2); a PNG through the
CLI; every refusal in one line."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from catfast.adapters import merge_adapter_, write_adapter
from catfast.adapters.formats import read_adapter
from catfast.cli import main
from catfast.errors import ExportError
from catfast.eval.flow_sampler import sample_flow_latents
from catfast.export.dit_runner import DitOnnxPipeline, flow_sigmas, transformer_feeds, transformer_output
from catfast.export.onnx import export_onnx
from catfast.integrations.factory_dit import init_dit_folder
from catfast.integrations.families import family_of
from catfast.integrations.peft_adapters import attach_adapter
from catfast.integrations.schedulers import flow_sampling_scheduler
from catfast.testing import random_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["tiny-flux", "tiny-sd3", "tiny-qwenimage"]
SIDE, TEXT, SCALE = 16, 16, 0.8  # pixels (8x8 latents, 16 image tokens), T5 tokens, LoRA scale
TOL = 1e-4  # catfast.export.validate.TOLERANCE["fp32"], the UNet export's bound
INPUTS = {
    "tiny-flux": [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
    ],  # fmt: skip
    "tiny-sd3": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
    "tiny-qwenimage": ["hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep"],
}


def load_pipe(folder):
    pipe = family_of(folder).pipeline_type().from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> (pipeline folder, adapter file, merged export folder, manifest)."""
    root = tmp_path_factory.mktemp("dit-onnx")
    out = {}
    for name in NAMES:
        folder = init_dit_folder(name, root / name)
        family = family_of(folder)
        adapter = random_adapter({"transformer": load_pipe(folder).transformer}, leaves=family.default_targets, seed=3)
        path = root / f"{name}-lora.safetensors"
        write_adapter(adapter, path)
        export = root / f"{name}-onnx"
        manifest = export_onnx(
            folder, export, adapters=[f"lora={path}:{SCALE}"], height=SIDE, width=SIDE, max_sequence_length=TEXT
        )
        out[name] = (folder, path, export, manifest)
    return out


def merged_model(folder, adapter_path, scale=SCALE):
    model = load_pipe(folder).transformer
    merge_adapter_(model, read_adapter(adapter_path), "transformer", scale)
    return model


def ort_predict(export, manifest, latents, sigmas, cond, feeds=()):
    """One transformer call in ORT, fed by name exactly as the runner feeds it, unpacked to [B, C, H, W]."""
    spec = manifest["transformer"]
    session = ort.InferenceSession(str(export / "transformer" / "model.onnx"), providers=["CPUExecutionProvider"])
    np_cond = {k: v.numpy() for k, v in cond.items()}
    named = transformer_feeds(spec, latents.numpy(), sigmas.numpy(), np_cond, 3.5)
    out = session.run(["out_hidden_states"], {**named, **dict(feeds)})[0]
    return torch.from_numpy(transformer_output(spec, out, *latents.shape[2:]))


def case(folder, seed=5):
    family, model = family_of(folder), load_pipe(folder).transformer
    g = torch.Generator().manual_seed(seed)
    text = TEXT + (77 if family.name == "sd3" else 0)
    latents = torch.randn(1, family.latent_channels(model), 8, 8, generator=g)
    return latents, torch.tensor([0.63]), family.example_cond(model, 1, text, generator=g)


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_manifest_names_inputs_layout_and_schedule(made, name):
    folder, _, export, manifest = made[name]
    assert manifest == json.loads((export / "manifest.json").read_text())
    assert manifest["family"] == name.removeprefix("tiny-") and manifest["mode"] == "merged"
    assert manifest["transformer"]["inputs"] == INPUTS[name]
    assert [i["name"] for i in manifest["components"]["transformer"]["inputs"]] == INPUTS[name]
    assert manifest["transformer"]["packing"] == ("none" if name == "tiny-sd3" else "2x2")
    assert manifest["latent"]["height"] == manifest["latent"]["width"] == 8
    assert (export / manifest["scheduler"]).is_file()
    encoders = {e["component"] for e in manifest["text"]["encoders"]}
    assert set(manifest["components"]) == {"transformer", "vae_decoder"} | encoders
    for comp in manifest["components"].values():
        assert comp["validation"]["passed"] and comp["validation"]["max_rel_err"] <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_ort_equals_family_predict_of_the_merged_model(made, name):
    """One transformer call: ORT (named feeds, the runner's packing) vs family.predict of the merged model."""
    folder, adapter, export, manifest = made[name]
    latents, sigmas, cond = case(folder)
    with torch.no_grad():
        want = family_of(folder).predict(merged_model(folder, adapter), latents, sigmas, cond)
        base = family_of(folder).predict(load_pipe(folder).transformer, latents, sigmas, cond)
    got = ort_predict(export, manifest, latents, sigmas, cond)
    assert rel(got, want) <= TOL, rel(got, want)
    assert rel(base, want) > 1e-3  # the LoRA matters (~1e-2 here, 100x the tolerance)


def test_adapter_inputs_equal_merged(made, tmp_path):
    """LoRA A/B as graph inputs (tiny-flux): the adapter's feeds give the merged model, no feeds the base."""
    folder, adapter, _, _ = made["tiny-flux"]
    out = tmp_path / "inputs"
    manifest = export_onnx(
        folder, out, adapters=[f"lora={adapter}:{SCALE}"], adapter_inputs=True, components=["transformer"],
        height=SIDE, width=SIDE, max_sequence_length=TEXT,
    )  # fmt: skip
    entry = manifest["components"]["transformer"]
    assert manifest["mode"] == "adapter_inputs" and entry["lora_inputs"]
    assert [i["name"] for i in entry["inputs"]] == INPUTS["tiny-flux"]
    feeds = load_file(out / manifest["adapters"][0]["weights"]["transformer"]["safetensors"])
    latents, sigmas, cond = case(folder, seed=7)
    family = family_of(folder)
    with torch.no_grad():
        want = family.predict(merged_model(folder, adapter), latents, sigmas, cond)
        base = family.predict(load_pipe(folder).transformer, latents, sigmas, cond)
    assert rel(ort_predict(out, manifest, latents, sigmas, cond, feeds), want) <= TOL
    assert rel(ort_predict(out, manifest, latents, sigmas, cond), base) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_runner_latents_equal_sample_flow_latents(made, name):
    """The ORT runner (tokenizers, exported text encoders, numpy schedule, named transformer feeds) against
    catfast's flow sampler on the same pipeline with the adapter attached: the same prompt, noise and steps."""
    folder, adapter, export, manifest = made[name]
    pipe = load_pipe(folder)
    attach_adapter(pipe.transformer, read_adapter(adapter), "lora")
    prompt, seed, steps = "a photo of a cat", 11, 4
    want = sample_flow_latents(
        pipe, [prompt], adapters=["lora"], seeds=[seed], steps=steps, height=SIDE, width=SIDE, scale=SCALE,
        max_sequence_length=TEXT,
    )  # fmt: skip
    runner = DitOnnxPipeline.load(export, "CPUExecutionProvider")
    # the runner's conditions are the pipeline's encode_prompt
    family = family_of(folder)
    with torch.no_grad():
        cond = family.encode_prompt(pipe, [prompt], max_sequence_length=TEXT)
    encoded = runner.encode([prompt])
    if family.name == "qwenimage":  # the runner pads the caption's states to the export's text length, mask 0
        n = cond["prompt_embeds"].shape[1]
        assert encoded.pop("prompt_embeds_mask")[0].tolist() == [1] * n + [0] * (TEXT - n)
        assert not encoded["prompt_embeds"][:, n:].any()
        encoded["prompt_embeds"] = encoded["prompt_embeds"][:, :n]
    for key, value in encoded.items():
        assert rel(torch.from_numpy(value), cond[key]) <= TOL, key
    # its schedule is flow_sampling_scheduler's
    recipe = manifest["sampler"]
    sched = flow_sampling_scheduler(pipe.scheduler.config, steps, 16, flow_sigmas=recipe["flow_sigmas"],
                                    max_shift=recipe["max_shift"])  # fmt: skip
    np.testing.assert_allclose(flow_sigmas(runner.scheduler_config, steps, 16, flow_sigmas=recipe["flow_sigmas"],
                                           max_shift=recipe["max_shift"]), sched.sigmas.numpy(), rtol=1e-6)  # fmt: skip
    noise = torch.randn((1, manifest["latent"]["channels"], 8, 8), generator=torch.Generator().manual_seed(seed))
    noise = noise.numpy()
    got = runner(prompt, steps=steps, latents=noise, output="latent")
    err = rel(torch.from_numpy(got), want)
    print(f"{name}: runner vs sample_flow_latents rel err {err:.2e}")
    assert err <= 1e-3, err
    image = runner(prompt, steps=steps, latents=noise)
    assert image.shape == (SIDE, SIDE, 3) and np.isfinite(image).all()


def test_run_onnx_cli_writes_a_png(made, tmp_path):
    _, _, export, _ = made["tiny-flux"]
    png = tmp_path / "out.png"
    r = CliRunner().invoke(main, ["run-onnx", "--model", str(export), "--prompt", "a cat", "--steps", "2", "--out",
                                  str(png), "--provider", "CPUExecutionProvider"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["run-onnx", "--model", str(export), "--prompt", "a cat", "--height", "32",
                                  "--out", str(tmp_path / "b.png")])  # fmt: skip
    assert r.exit_code != 0 and "traced at 16x16" in r.output and "Traceback" not in r.output


def test_bad_input_one_line(made, tmp_path, tiny):
    folder, adapter, _, _ = made["tiny-flux"]

    def refused(base, match, **kw):
        with pytest.raises(ExportError, match=match) as e:
            export_onnx(base, tmp_path / "x", **kw)
        assert "\n" not in str(e.value)

    refused(folder, r"--fp16 is a UNet export option", fp16=True)
    refused(folder, r"--dynamic is a UNet export option", dynamic=True)
    refused(folder, r"'unet' is not a flux component", components=["unet"])
    refused(folder, r"multiples of 4 pixels", height=18)
    refused(tiny, r"--height is a DiT export option", height=16)
    qwen = init_dit_folder("tiny-qwenimage", tmp_path / "qwen")
    refused(qwen, r"'text_encoder_2' is not a qwenimage component", components=["text_encoder_2"])
    r = CliRunner().invoke(main, ["export", "onnx", "--base", str(folder), "--fp16", "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "--fp16 is a UNet export option" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    shutil.rmtree(qwen)


def test_qwenimage_padded_masked_text_equals_the_caption_alone(made):
    """Qwen-Image's export pads captions to its text length with mask 0: ORT on a 9-token caption padded to 16
    equals ``family.predict`` of the merged model on the caption alone, unpadded (the complex rotary of diffusers,
    the real one in the graph)."""
    folder, adapter, export, manifest = made["tiny-qwenimage"]
    latents, sigmas, cond = case(folder, seed=9)
    cond["prompt_embeds_mask"][0, 9:] = 0
    alone = {"prompt_embeds": cond["prompt_embeds"][:, :9], "prompt_embeds_mask": None}
    with torch.no_grad():
        want = family_of(folder).predict(merged_model(folder, adapter), latents, sigmas, alone)
    assert rel(ort_predict(export, manifest, latents, sigmas, cond), want) <= TOL
