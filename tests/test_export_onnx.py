"""ONNX export end to end on the tiny model, in real ONNX Runtime, with diffusers as the oracle.

Exports (once per module): merged (adapter a1 at scale 0.7, all three components, dynamic axes), adapter
inputs (a1 at 0.7 and a2, all components), fp16 merged UNet, and a UNet written with external data. LoRA B is
random and nonzero and alpha != rank everywhere. Checks: the manifest; ORT vs diffusers with the adapter
loaded by diffusers' own `load_lora_weights` (UNet and text encoder, at a second batch and latent size);
adapter inputs (safetensors feeds and ORT adapter files) equal the merged export; fp16 within its tolerance;
the ORT pipeline vs diffusers' StableDiffusionPipeline (DDIM) to the image; every bad input.
"""

import copy
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.numpy import load_file

from catfast.adapters import merge_adapter_, write_adapter
from catfast.cli import main
from catfast.errors import AdapterShapeError, ModelLoadError
from catfast.export import graphs as export_graphs
from catfast.export import onnx as export_mod
from catfast.export.adapter_inputs import (
    LoraInputLayer,
    LoraInputsGraph,
    adapter_feeds,
    detach_lora_inputs,
    lora_input_specs,
)
from catfast.export.onnx import TOLERANCE, AdapterSpec, ExportError, UNetGraph, export_onnx, read_manifest
from catfast.export.runner import DDIM, OnnxPipeline, RunnerError, save_png
from catfast.integrations.factory import build_unet, init_model_folder
from catfast.integrations.models import load_base
from catfast.testing import assert_rel_close, random_adapter, rel_err

FP32 = TOLERANCE["fp32"]  # 1e-4 relative, the bound
ALL = ["unet", "text_encoder", "vae_decoder"]
PROMPT = "a cat statue on a carpet"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_model_folder("tiny", tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def base(tiny):
    return load_base(tiny)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """a1: every Linear/Conv2d of the UNet and the text encoder (ranks 2-4); a2: UNet attention only (ranks 4, 8)."""
    folder = tmp_path_factory.mktemp("adapters")
    a1 = random_adapter({"unet": base.unet, "text_encoder": base.text_encoder}, seed=1)
    a2 = random_adapter({"unet": base.unet}, seed=2, ranks=(4, 8), alphas=(3.0, 12.0), leaves=("to_q", "to_v"))
    paths = {"a1": folder / "a1.safetensors", "a2": folder / "a2.safetensors"}
    write_adapter(a1, paths["a1"])
    write_adapter(a2, paths["a2"])
    return {"a1": a1, "a2": a2, "paths": paths}


@pytest.fixture(scope="module")
def merged(tiny, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "merged"
    export_onnx(tiny, out, adapters=[f"{adapters['paths']['a1']}:0.7"], components=ALL, dynamic=True)
    return out


@pytest.fixture(scope="module")
def inputs(tiny, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "inputs"
    specs = [f"{adapters['paths']['a1']}:0.7", f"second={adapters['paths']['a2']}"]
    export_onnx(tiny, out, adapters=specs, components=ALL, adapter_inputs=True)
    return out


def _session(folder, component="unet"):
    return ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])


def _unet_inputs(batch=2, side=(16, 16), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    c = torch.randn(batch, 77, 32, generator=g)
    return x.to(dtype), t, c.to(dtype)


def _ort_unet(sess, x, t, c, extra=None, run_options=None):
    feed = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy(), **(extra or {})}
    return torch.from_numpy(sess.run(None, feed, run_options)[0])


def _diffusers_pipe(tiny, adapter_file=None, scale=1.0):
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter_file is not None:
        pipe.load_lora_weights(str(adapter_file), adapter_name="x")
        pipe.set_adapters(["x"], [scale])
    return pipe


# ------------------------------------------------------------------------------------------- manifest


def test_merged_manifest_names_files_io_and_errors(merged, adapters):
    m = read_manifest(merged)
    assert m["mode"] == "merged" and m["dtype"] == "fp32" and m["opset"] == 17 and m["dynamic"]
    assert [(a["name"], a["scale"], a["components"]) for a in m["adapters"]] == [("a1", 0.7, ["unet", "text_encoder"])]
    unet = m["components"]["unet"]
    assert unet["file"] == "unet/model.onnx" and unet["external_data"] is None
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o["name"] for o in unet["outputs"]] == ["out_sample"]
    assert unet["inputs"][0]["shape"] == ["batch", 4, "height", "width"]
    assert unet["inputs"][1]["dtype"] == "float32" and unet["outputs"][0]["dtype"] == "float32"
    assert [i["name"] for i in m["components"]["text_encoder"]["inputs"]] == ["input_ids"]
    assert m["components"]["text_encoder"]["inputs"][0]["dtype"] == "int64"
    assert [o["name"] for o in m["components"]["vae_decoder"]["outputs"]] == ["sample"]
    for name, comp in m["components"].items():
        v = comp["validation"]
        assert v["passed"] and 0 < v["max_rel_err"] <= FP32 and v["max_abs_err"] > 0, name
        assert len({r["batch"] for r in v["runs"]}) == 2, "validated at two batch sizes"
        assert comp["opset"] == 17 and comp["dtype"] == "fp32"
        onnx.checker.check_model(str(merged / comp["file"]))
    assert (merged / "tokenizer").is_dir() and (merged / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((merged / "manifest.json").read_text()) == m
    assert not list(merged.parent.glob(".*partial*"))


# ------------------------------------------------------------------------------- diffusers as oracle


@torch.no_grad()
def test_merged_export_matches_diffusers_load_lora_weights(merged, tiny, adapters):
    """diffusers loads a1 itself (peft layers, scale 0.7); the ORT graphs of catfast's merge give its outputs."""
    pipe = _diffusers_pipe(tiny, adapters["paths"]["a1"], 0.7)
    base_pipe = _diffusers_pipe(tiny)
    sess = _session(merged)
    for batch, side in ((2, (16, 16)), (1, (20, 12))):  # the second shape exercises the dynamic axes
        x, t, c = _unet_inputs(batch, side, seed=batch)
        want = pipe.unet(x, t, c).sample
        assert rel_err(base_pipe.unet(x, t, c).sample, want) > 1e-2, "adapter must change the output"
        assert_rel_close(_ort_unet(sess, x, t, c), want, FP32, f"unet batch {batch} {side}")
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    got = _session(merged, "text_encoder").run(None, {"input_ids": ids.numpy()})
    want = pipe.text_encoder(ids)
    assert_rel_close(torch.from_numpy(got[0]), want[0], FP32, "text encoder last_hidden_state")
    assert_rel_close(torch.from_numpy(got[1]), want[1], FP32, "text encoder pooler_output")
    z = torch.randn(2, 4, 8, 12)
    got = _session(merged, "vae_decoder").run(None, {"latent_sample": z.numpy()})[0]
    assert_rel_close(torch.from_numpy(got), pipe.vae.decode(z).sample, FP32, "vae decoder")


# ------------------------------------------------------------------------------------- adapter inputs


@torch.no_grad()
def test_adapter_inputs_equal_the_merged_export_and_torch(inputs, merged, adapters, base):
    m = read_manifest(inputs)
    assert m["mode"] == "adapter_inputs"
    assert {a["name"]: sorted(a["weights"]) for a in m["adapters"]} == {
        "a1": ["text_encoder", "unet"],
        "second": ["unet"],
    }
    lora = m["components"]["unet"]["lora_inputs"]
    assert len(lora) == 83 and lora[0]["A"].endswith(".lora_A") and lora[0]["A_shape"][0] == "rank_0"
    assert m["components"]["unet"]["validation"]["max_rel_err"] <= FP32
    sess, merged_sess = _session(inputs), _session(merged)
    x, t, c = _unet_inputs(3, seed=7)
    a1 = load_file(inputs / "adapters" / "a1" / "unet.safetensors")
    assert_rel_close(_ort_unet(sess, x, t, c, a1), _ort_unet(merged_sess, x, t, c), FP32, "a1: inputs vs merged")

    # an ORT adapter file (RunOptions.add_active_adapter) is the same as feeding the tensors
    options = ort.RunOptions()
    ort_adapter = ort.LoraAdapter()
    ort_adapter.Load(str(inputs / "adapters" / "second" / "unet.onnx_adapter"))
    options.add_active_adapter(ort_adapter)
    feeds = load_file(inputs / "adapters" / "second" / "unet.safetensors")
    modes = {p.stat().st_mode for p in inputs.rglob("*") if p.is_file()}
    assert len(modes) == 1, "every file of the export has the same (umask) mode"
    via_file = _ort_unet(sess, x, t, c, run_options=options)
    assert torch.equal(via_file, _ort_unet(sess, x, t, c, feeds))
    unet = copy.deepcopy(base.unet)
    merge_adapter_(unet, adapters["a2"])
    assert_rel_close(via_file, unet(x, t, c).sample, FP32, "a2 via ORT adapter file vs torch merged")

    # nothing fed: the LoRA inputs' defaults make it the base model
    base_out = base.unet(x, t, c).sample
    assert_rel_close(_ort_unet(sess, x, t, c), base_out, FP32, "no adapter vs base")
    assert rel_err(via_file, base_out) > 1e-2


def test_lora_input_transform_matches_merge_and_detaches(base, adapters):
    unet = copy.deepcopy(base.unet)
    original = dict(unet.named_modules())
    specs = lora_input_specs(unet, [adapters["a1"], adapters["a2"]])
    graph = LoraInputsGraph(UNetGraph(unet), unet, specs, num_inputs=3)
    assert sum(isinstance(m, LoraInputLayer) for m in unet.modules()) == len(specs) == 83
    x, t, c = _unet_inputs(2, seed=3)
    feeds = adapter_feeds(adapters["a2"], specs, scale=0.5)
    with torch.no_grad():
        got = graph(x, t, c, *feeds.values())
        merged = copy.deepcopy(base.unet)
        merge_adapter_(merged, adapters["a2"], scale=0.5)
        assert_rel_close(got, merged(x, t, c).sample, 1e-5, "transform vs merge")
    assert sorted(detach_lora_inputs(unet)) == sorted(s.path for s in specs)
    assert all(original[n] is m for n, m in unet.named_modules() if n in original)


# ----------------------------------------------------------------------------------------------- fp16


@torch.no_grad()
def test_fp16_export_within_its_tolerance(tiny, adapters, base, tmp_path):
    a1 = str(adapters["paths"]["a1"])
    m = export_onnx(tiny, tmp_path / "fp16", adapters=[a1], fp16=True, components=["unet", "text_encoder"])
    assert m["components"]["text_encoder"]["outputs"][0]["dtype"] == "float16"
    assert m["components"]["text_encoder"]["validation"]["max_rel_err"] <= TOLERANCE["fp16"]
    unet_m = m["components"]["unet"]
    assert unet_m["dtype"] == "fp16" and unet_m["inputs"][0]["dtype"] == "float16"
    assert unet_m["inputs"][1]["dtype"] == "float32", "timestep stays fp32"
    x, t, c = _unet_inputs(2, seed=5, dtype=torch.float16)
    got = _ort_unet(_session(tmp_path / "fp16"), x, t, c).float()
    ref32 = copy.deepcopy(base.unet)
    merge_adapter_(ref32, adapters["a1"])
    want = ref32(x.float(), t, c.float()).sample
    torch_fp16 = copy.deepcopy(ref32).half()(x, t, c).sample.float()
    torch_err = rel_err(torch_fp16, want)
    assert_rel_close(got, want, TOLERANCE["fp16"], "ORT fp16 vs torch fp32")
    assert rel_err(got, want) <= 2 * torch_err + 1e-3, "at most twice torch's own fp16 error plus a floor"
    assert unet_m["validation"]["max_rel_err"] <= TOLERANCE["fp16"]


# -------------------------------------------------------------------------------------- external data


def test_external_data_export_loads_in_ort(tiny, adapters, tmp_path):
    """A model over the threshold (2 GB by default; 0 here) is written as graph + one external data file."""
    out = tmp_path / "ext"
    m = export_onnx(tiny, out, adapters=[str(adapters["paths"]["a2"])], external_data_over=0)
    unet = m["components"]["unet"]
    assert unet["external_data"] == "unet/model.onnx.data"
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["model.onnx", "model.onnx.data"]
    graph, data = (out / "unet" / "model.onnx").stat(), (out / "unet" / "model.onnx.data").stat()
    assert graph.st_size < 0.2 * data.st_size and graph.st_mode == data.st_mode
    onnx.checker.check_model(str(out / "unet" / "model.onnx"))
    assert unet["validation"]["passed"]
    (out / "unet" / "model.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="model.onnx.data is missing"):
        read_manifest(out)


# --------------------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("kind", ["merged", "inputs"])
def test_onnx_pipeline_matches_diffusers_pipeline(kind, merged, inputs, tiny, adapters):
    """The ORT pipeline (numpy DDIM, CFG) vs StableDiffusionPipeline + DDIMScheduler + load_lora_weights."""
    folder, adapter = (merged, None) if kind == "merged" else (inputs, "a1")
    pipe = OnnxPipeline.load(folder)
    assert pipe.provider == "CPUExecutionProvider"
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    kwargs = dict(steps=5, guidance_scale=7.5, latents=latents, adapter=adapter)
    ref = _diffusers_pipe(tiny, adapters["paths"]["a1"], 0.7)
    args = dict(num_inference_steps=5, guidance_scale=7.5, latents=torch.from_numpy(latents))
    want_latent = ref(PROMPT, output_type="latent", **args).images
    assert_rel_close(torch.from_numpy(pipe(PROMPT, output="latent", **kwargs)), want_latent, FP32, "final latents")
    image = pipe(PROMPT, **kwargs)
    want = ref(PROMPT, output_type="np", **args).images[0]
    assert image.shape == (32, 32, 3) and np.abs(image - want).max() <= 1e-4
    if kind == "inputs":  # the base (no adapter) gives another image, as diffusers without the LoRA does
        base_image = pipe(PROMPT, steps=5, guidance_scale=7.5, latents=latents)
        want_base = _diffusers_pipe(tiny)(PROMPT, output_type="np", **args).images[0]
        assert np.abs(base_image - want_base).max() <= 1e-4
        assert np.abs(base_image - image).max() > 1e-2


def test_ddim_matches_diffusers_scheduler(base):
    configs = [
        dict(base.scheduler.config),
        dict(base.scheduler.config, prediction_type="v_prediction", timestep_spacing="trailing"),
        dict(
            base.scheduler.config,
            timestep_spacing="linspace",
            set_alpha_to_one=False,
            clip_sample=True,
            beta_schedule="linear",
        ),
    ]
    g = torch.Generator().manual_seed(0)
    for config in configs:
        ours, theirs = DDIM(config), DDIMScheduler.from_config(config)
        theirs.set_timesteps(7)
        ts = ours.timesteps(7)
        assert ts.tolist() == theirs.timesteps.tolist(), config["timestep_spacing"]
        x = torch.randn(1, 4, 8, 8, generator=g)
        for t in ts:
            out = torch.randn(1, 4, 8, 8, generator=g)
            want = theirs.step(out, int(t), x).prev_sample
            got = torch.from_numpy(ours.step(out.numpy(), int(t), x.numpy()))
            assert_rel_close(got, want, 1e-5, f"{config['prediction_type']} t={t}")
            x = want


def test_run_onnx_cli_writes_a_png(inputs, tmp_path):
    png = tmp_path / "out.png"
    args = ["run-onnx", "--model", inputs, "--prompt", PROMPT, "--adapter", "second", "--steps", "3", "--out", png]
    r = CliRunner().invoke(main, list(map(str, args)))
    assert r.exit_code == 0, r.output
    assert "CPUExecutionProvider" in r.output
    with Image.open(png) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    r = CliRunner().invoke(main, list(map(str, args[:5] + ["--adapter", "nope", "--out", png, "--overwrite"])))
    assert r.exit_code == 1 and "no adapter 'nope'; this export has a1, second" in r.output


def test_runner_refuses_what_the_export_cannot_do(merged, inputs, tmp_path):
    with pytest.raises(RunnerError, match="merged into this export"):
        OnnxPipeline.load(merged)(PROMPT, adapter="a1", steps=1)
    with pytest.raises(RunnerError, match="fixed spatial axes"):
        OnnxPipeline.load(inputs)(PROMPT, steps=1, height=48, width=48)
    partial = tmp_path / "no-vae"
    shutil.copytree(merged, partial)
    m = json.loads((partial / "manifest.json").read_text())
    del m["components"]["vae_decoder"]
    (partial / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="no vae_decoder"):
        OnnxPipeline.load(partial)
    with pytest.raises(ModelLoadError, match="not a catfast ONNX export"):
        OnnxPipeline.load(tmp_path)
    save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "x" / "y.png")  # makes its folder


# ------------------------------------------------------------------------------------------ bad input


def _no_leftovers(parent):
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_adapter_for_another_base_is_refused_before_writing(tiny, tmp_path):
    small = build_unet("small")
    foreign = random_adapter({"unet": small}, leaves=("to_q",))
    write_adapter(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(AdapterShapeError, match="does not fit this unet"):
        export_onnx(tiny, tmp_path / "out", adapters=[str(tmp_path / "foreign.safetensors")])
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_bad_options_and_folders(tiny, adapters, tmp_path):
    a2 = str(adapters["paths"]["a2"])
    for opset in (9, 30):
        with pytest.raises(ExportError, match=f"opset {opset} is not supported"):
            export_onnx(tiny, tmp_path / "o", opset=opset)
    with pytest.raises(ExportError, match="unknown component 'vae'"):
        export_onnx(tiny, tmp_path / "o", components=["vae"])
    with pytest.raises(ExportError, match="needs at least one --adapter"):
        export_onnx(tiny, tmp_path / "o", adapter_inputs=True)
    with pytest.raises(ExportError, match="no such adapter file"):
        export_onnx(tiny, tmp_path / "o", adapters=[str(tmp_path / "missing.safetensors")])
    text_only = random_adapter({"text_encoder": load_base(tiny).text_encoder})
    with pytest.raises(ExportError, match="none of which is exported"):
        export_onnx(tiny, tmp_path / "o", adapters=[AdapterSpec("te", adapter=text_only)])
    with pytest.raises(ExportError, match="two adapters are named 'a2'"):
        export_onnx(tiny, tmp_path / "o", adapters=[a2, a2 + ":0.5"])

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_onnx(tiny, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    export_onnx(tiny, busy, overwrite=True)
    assert sorted(p.name for p in busy.iterdir()) == ["manifest.json", "scheduler", "tokenizer", "unet"]

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="component 'vae' is missing"):
        export_onnx(broken, tmp_path / "o")
    assert not (tmp_path / "o").exists() and _no_leftovers(tmp_path)


def test_failed_validation_leaves_nothing_that_looks_complete(tiny, adapters, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous export")
    monkeypatch.setitem(TOLERANCE, "fp32", 1e-12)
    with pytest.raises(ExportError, match="ONNX Runtime output differs from PyTorch"):
        export_onnx(tiny, tmp_path / "out", adapters=[str(adapters["paths"]["a2"])], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.txt"]  # the old export is untouched
    assert _no_leftovers(tmp_path)


def test_base_model_in_memory_is_left_unchanged(base, adapters, tmp_path):
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    export_onnx(base, tmp_path / "mem", adapters=[AdapterSpec("a2", adapter=adapters["a2"])])
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())


def test_export_cli_one_line_errors_and_spec_parsing(tiny, tmp_path):
    r = CliRunner().invoke(main, ["export", "onnx", "--base", str(tiny), "--out", str(tmp_path / "o"), "--opset", "9"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: opset 9 is not supported: choose 14..20 (default 17)"
    ]
    assert AdapterSpec.parse("dir/a.safetensors:0.5") == AdapterSpec("dir/a.safetensors", 0.5)
    assert AdapterSpec.parse("n=dir/a.safetensors").label == "n"
    assert AdapterSpec.parse("dir/a:b.safetensors") == AdapterSpec("dir/a:b.safetensors", 1.0)


def test_bench_reports_times_and_parity():
    from catfast.bench.onnx import bench_onnx

    r = bench_onnx("tiny", reps=1)
    assert r["median_ms"]["torch"] > 0 and r["median_ms"]["ort:CPUExecutionProvider:merged"] > 0
    assert all(e <= FP32 for e in r["timed_rel_err_vs_torch"].values())
    assert export_mod.EXTERNAL_DATA_OVER < 2**31


def test_per_tensor_external_files_are_gathered_into_one(tmp_path):
    """What the TorchScript exporter writes for a >2 GB model (one file per tensor) becomes graph + one file."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    b = np.arange(4, dtype=np.float32)  # small: stays inline
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.tile(b, 16), "b")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 9  # what onnxruntime 1.31 reads (onnx 1.23 writes 14 by default)
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(model, str(raw / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False)
    assert sorted(p.name for p in raw.iterdir()) == ["model.onnx", "w"]  # b (256 bytes) stays inline
    data = export_graphs._finalize(raw, tmp_path / "out" / "model.onnx", 0, {})
    assert data == "model.onnx.data" and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", data]
    assert not raw.exists()
    onnx.checker.check_model(str(tmp_path / "out" / "model.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    xv = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": xv})[0], xv @ w + np.tile(b, 16), rtol=1e-5, atol=1e-5)
