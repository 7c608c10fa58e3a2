"""catfast.eval: the batched multi-adapter sampler against diffusers' own pipeline, grids, the CLIP
encoder from a local folder, the KPS math on hand-computed embeddings, and KPS end to end from files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import write_adapter
from catfast.errors import CatfastError
from catfast.eval.encoders import ImageTextEncoder, load_clip, make_tiny_clip
from catfast.eval.grids import grid_layout, save_grid
from catfast.eval.kps import format_kps_table, harmonic_mean, kps_eval, kps_scores, read_images, run_kps_cli
from catfast.eval.sampler import sample_images
from catfast.integrations.factory import build_base, init_model_folder
from catfast.integrations.patch import patch_report, patch_unet, unpatch_unet
from catfast.integrations.peft_adapters import add_lora, extract_adapter
from catfast.testing import randomize_lora_

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LOCON = TARGETS + ("conv1", "conv2", "conv", "conv_shortcut")  # kohya LoCon: 3x3, stride-2 and 1x1 convs
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _base(*adapters: tuple[str, int], targets=TARGETS):
    """The tiny base with randomized (non-zero) peft adapters of the given (name, rank)."""
    base = build_base("tiny")
    for name, rank in adapters:
        add_lora(base.unet, rank=rank, alpha=4.0, target_modules=targets, adapter_name=name)
    if adapters:  # each adapter its own random weights (peft starts lora_B at zero)
        randomize_lora_(base.unet, seed=1, std=0.3)
    return base


def _pipeline_image(base, prompt, adapter, seed, *, steps=STEPS, guidance=7.5, scale=1.0):
    """What diffusers' StableDiffusionPipeline gives for one row, with the adapter set the peft way."""
    from catfast.integrations.models import diffusers_pipeline

    pipe = diffusers_pipeline(base)
    if adapter is None:
        base.unet.disable_adapters()
    else:
        base.unet.set_adapter(adapter)
    try:
        return pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pil",
            generator=torch.Generator().manual_seed(seed),
            cross_attention_kwargs=None if scale == 1.0 else {"scale": scale},
        ).images[0]
    finally:
        base.unet.enable_adapters()


def _diff(a: Image.Image, b: Image.Image) -> int:
    """Largest per-channel difference in uint8 levels."""
    return int(np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32)).max())


# ---------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("targets", [TARGETS, LOCON], ids=["attention", "locon"])
def test_each_row_equals_diffusers_pipeline_for_that_row_alone(targets):
    base = _base(("a", 4), targets=targets)
    rows = [("a photo of a cat", "a", 3), ("a photo of a cat", None, 3), ("a red car", None, 7)]
    images = sample_images(
        base, [r[0] for r in rows], adapters=[r[1] for r in rows], seeds=[r[2] for r in rows], steps=STEPS, guidance=7.5
    )
    assert patch_report(base.unet) is None  # left unpatched, as it was
    assert all(im.size == (32, 32) for im in images)
    for im, (prompt, adapter, seed) in zip(images, rows):
        # fp32 on one machine: equal up to a uint8 rounding boundary
        assert _diff(im, _pipeline_image(base, prompt, adapter, seed)) <= 1, (prompt, adapter, seed)
    assert _diff(images[0], images[1]) > 20  # the adapter row really differs from the base row


def test_two_adapters_and_base_rows_in_one_call_scale_and_no_cfg():
    base = _base(("a", 4), ("b", 2))
    rows = [("a dog", "a", 1), ("a dog", None, 1), ("a dog", "b", 1)]
    for guidance, scale in ((7.5, 1.0), (1.0, 0.5)):  # CFG on; then cond rows only with a LoRA scale
        images = sample_images(
            base,
            [r[0] for r in rows],
            adapters=[r[1] for r in rows],
            seeds=[r[2] for r in rows],
            steps=STEPS,
            guidance=guidance,
            scale=scale,
        )
        for im, (prompt, adapter, seed) in zip(images, rows):
            ref = _pipeline_image(base, prompt, adapter, seed, guidance=guidance, scale=scale)
            assert _diff(im, ref) <= 1, (prompt, adapter, seed, guidance, scale)
        assert min(_diff(images[0], images[1]), _diff(images[1], images[2]), _diff(images[0], images[2])) > 10


def test_sdxl_rows_equal_diffusers_sdxl_pipeline():
    from catfast.integrations.models import diffusers_pipeline

    base = build_base("tiny-sdxl")
    add_lora(base.unet, rank=4, alpha=4.0, target_modules=TARGETS, adapter_name="a")
    randomize_lora_(base.unet, seed=1, std=0.3)
    images = sample_images(base, ["a photo of a cat"] * 2, adapters=["a", None], seeds=[3, 3], steps=STEPS)
    pipe = diffusers_pipeline(base)
    refs = []
    for adapter in ("a", None):
        if adapter is None:
            base.unet.disable_adapters()
        else:
            base.unet.set_adapter(adapter)
        gen = torch.Generator().manual_seed(3)
        refs.append(pipe("a photo of a cat", num_inference_steps=STEPS, guidance_scale=7.5, generator=gen).images[0])
    base.unet.enable_adapters()
    assert _diff(images[0], refs[0]) <= 1 and _diff(images[1], refs[1]) <= 1
    assert _diff(images[0], images[1]) > 20


def test_patched_unet_stays_patched_and_row_chunks_change_nothing():
    base = _base(("a", 4), ("b", 2))
    report = patch_unet(base.unet)
    args = dict(adapters=["b", None, "a"], seeds=[5, 6, 7], steps=2, guidance=5.0)
    whole = sample_images(base, ["a cat", "a cat", "a tree"], **args)
    chunked = sample_images(base, ["a cat", "a cat", "a tree"], max_rows=2, **args)
    assert patch_report(base.unet) is report
    assert all(_diff(x, y) <= 1 for x, y in zip(whole, chunked))
    unpatch_unet(base.unet)


def test_plain_unet_and_sampler_errors():
    base = build_base("tiny")  # no adapter at all: base rows run unpatched
    assert len(sample_images(base, ["a cat"], adapters=[None], seeds=[0], steps=1)) == 1
    with pytest.raises(CatfastError, match="no adapter named 'x'"):
        sample_images(base, ["a cat"], adapters=["x"], seeds=[0], steps=1)
    with pytest.raises(ValueError, match="equal length"):
        sample_images(base, ["a cat", "a dog"], adapters=[None], seeds=[0, 1], steps=1)
    base = _base(("a", 2))
    base.unet.disable_adapters()
    with pytest.raises(CatfastError, match="enable_adapters"):
        sample_images(base, ["a cat"], adapters=["a"], seeds=[0], steps=1)
    assert patch_report(base.unet) is None  # the failed call unpatched again


# ------------------------------------------------------------------------------------------------ grids


def test_save_grid_writes_png_atomically_with_labels(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    images = [Image.new("RGB", (8, 6), c) for c in colours]
    path = tmp_path / "sub" / "grid.png"
    save_grid(images, 2, 3, path, min_cell=None)  # min_cell None: pictures at their own size
    grid = Image.open(path)
    assert grid.format == "PNG" and grid.size == (24, 12)
    assert grid.getpixel((17, 7)) == colours[5]  # row 1, column 2
    layout = save_grid(images, 3, 2, path, labels=["one", "two", "three"], min_cell=None)
    labelled = Image.open(path)
    offset = labelled.width - 16
    # rows as tall as a label line (6 px pictures no longer let the labels overlap), the picture centred in it
    y = 2 * layout.row_h + (layout.row_h - 6) // 2
    assert offset > 0 and labelled.height == 3 * layout.row_h > 18
    assert labelled.getpixel((offset + 9, y + 1)) == colours[5]
    before = path.read_bytes()
    with pytest.raises(AttributeError):  # a non-image fails mid-way: the old grid stays, no temp file
        save_grid(images[:5] + ["not an image"], 2, 3, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError, match="needs 6 images"):
        save_grid(images[:5], 2, 3, path)


# --------------------------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


def test_tiny_clip_loads_and_embeds(clip_dir):
    enc = load_clip(clip_dir)
    assert isinstance(enc, ImageTextEncoder)
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (32, 32), (0, 0, 250))]
    emb = enc.embed_images(images + images[:1])
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])
    assert (emb[0] - emb[1]).abs().max() > 1e-3
    text = enc.embed_texts(["a photo of a cat", "a red car"])
    assert text.shape == (2, 16) and (text[0] - text[1]).abs().max() > 1e-3
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))


def test_load_clip_refuses_missing_or_incomplete_folders(clip_dir, tmp_path):
    with pytest.raises(CatfastError, match="no such CLIP folder"):
        load_clip(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in clip_dir.iterdir():
        if f.name != "preprocessor_config.json":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CatfastError, match="preprocessor_config.json"):
        load_clip(broken)


# ------------------------------------------------------------------------------------------- KPS maths


def _u(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def _t(*angles: float) -> torch.Tensor:
    return torch.tensor([_u(a) for a in angles])


def test_harmonic_mean_edge_cases():
    assert harmonic_mean([0.5]) == 0.5
    assert harmonic_mean([0.25, 0.75]) == pytest.approx(2 * 0.25 * 0.75 / (0.25 + 0.75))
    assert harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    assert harmonic_mean([1.0, 1.0]) == 1.0
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([0.5, -0.1])


def test_kps_scores_match_hand_computation():
    # three samples: prompt 0 with two seeds, prompt 1 with one
    base, without, with_ = _t(0, 0, 0), _t(0, 90, 60), _t(0, 180, 90)
    prompts, refs = _t(0, 0, 0), _t(0, 90)
    out = kps_scores(base, without, with_, prompts, [0, 0, 1], reference_emb=refs)
    # sim = (cos + 1) / 2: pres = [1, .5, .75]; id vs refs = [(1+.5)/2, (0+.5)/2, (.5+1)/2]
    assert [s["preservation"] for s in out["samples"]] == pytest.approx([1, 0.5, 0.75])
    assert [s["identity"] for s in out["samples"]] == pytest.approx([0.75, 0.25, 0.75])
    total = out["total"]
    assert total["preservation"] == pytest.approx(9 / 13)  # 3 / (1 + 2 + 4/3)
    assert total["identity"] == pytest.approx(9 / 20)  # 3 / (4/3 + 4 + 4/3)
    assert total["kps"] == pytest.approx(6 / 11)  # HM(9/13, 9/20)
    assert total["prompt_similarity"] == pytest.approx(0.0)  # cos = 1, -1, 0
    assert total["prompt_similarity_base"] == pytest.approx(1.0)
    assert total["prompt_similarity_without_trigger"] == pytest.approx(0.5)  # 1, 0, .5
    p0, p1 = out["per_prompt"]
    assert (p0["preservation"], p0["identity"], p0["kps"]) == pytest.approx((2 / 3, 3 / 8, 12 / 25))
    assert (p1["preservation"], p1["identity"], p1["kps"]) == pytest.approx((0.75, 0.75, 0.75))
    # no references: each trigger image against the other two (sims 0 / .5 / .5)
    alone = kps_scores(base, without, with_, None, [0, 0, 1])
    assert [s["identity"] for s in alone["samples"]] == pytest.approx([0.25, 0.25, 0.5])
    assert "prompt_similarity" not in alone["total"]
    arithmetic = kps_scores(base, without, with_, prompts, [0, 0, 1], reference_emb=refs, aggregate_with="arithmetic")
    assert arithmetic["total"]["preservation"] == pytest.approx(0.75)
    with pytest.raises(CatfastError, match="at least 2"):
        kps_scores(base[:1], without[:1], with_[:1], None, [0])


# ------------------------------------------------------------------------------------------ KPS end to end


class MeanColourEncoder:
    """An image-only encoder (like issue 5's domain classifier): the normalised mean RGB, centred."""

    def embed_images(self, images):
        x = torch.stack(
            [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).mean((0, 1)) for im in images]
        )
        return torch.nn.functional.normalize(x - 127.5, dim=1)

    def embed_texts(self, texts):
        raise NotImplementedError("image-only encoder")


def test_kps_eval_zero_adapter_preserves_exactly_and_accepts_any_encoder(tmp_path):
    base = build_base("tiny")
    add_lora(base.unet, rank=2, alpha=2.0, target_modules=TARGETS, adapter_name="fresh")  # B = 0: no change
    refs = [Image.new("RGB", (32, 32), (250, 20, 20))]
    grid = tmp_path / "kps.png"
    result = kps_eval(
        base, "fresh", ["a cat", "a dog"], [0], "sks", MeanColourEncoder(), refs, steps=1, max_rows=4, grid_path=grid
    )
    assert result["total"]["preservation"] == pytest.approx(1.0, abs=1e-6)
    assert result["settings"]["references"] == 1 and "prompt_similarity" not in result["total"]
    assert [r["prompt"] for r in result["per_prompt"]] == ["a cat", "a dog"]
    assert [(s["prompt"], s["seed"]) for s in result["samples"]] == [("a cat", 0), ("a dog", 0)]
    t = result["total"]
    assert t["kps"] == pytest.approx(harmonic_mean([t["preservation"], t["identity"]]))
    heads = ["base", "adapter, without trigger", 'adapter, "sks, ..."']
    labels = ["a cat / seed 0", "a dog / seed 0"]
    one_row_each = grid_layout([(32, 32)] * 6, 2, 3, labels=labels, col_labels=heads)  # one row per (prompt, seed)
    assert Image.open(grid).size == one_row_each.size
    assert one_row_each.size[1] < grid_layout([(32, 32)] * 9, 3, 3, labels=labels + ["x"], col_labels=heads).size[1]
    assert "prompt sim" not in format_kps_table(result)
    with pytest.raises(CatfastError, match="already contains the trigger"):
        kps_eval(base, "fresh", ["a sks cat"], [0, 1], "sks", MeanColourEncoder(), steps=1)


@pytest.fixture(scope="module")
def kps_files(tmp_path_factory):
    """A tiny diffusers folder, a non-zero adapter file written with write_adapter, and a prompts file."""
    root = tmp_path_factory.mktemp("kps")
    model = init_model_folder("tiny", root / "model")
    base = _base(("trained", 4))
    adapter_file = root / "adapter.safetensors"
    write_adapter(extract_adapter(base.unet, "trained"), adapter_file)
    prompts = root / "prompts.txt"
    prompts.write_text("# class prompts\na photo of a cat\n\na red car\n")
    return model, adapter_file, prompts


def test_run_kps_cli_from_files(kps_files, clip_dir, tmp_path):
    model, adapter_file, prompts = kps_files
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("RGB", (48, 48), (30, 200, 30)).save(refs / "r0.png")
    out = tmp_path / "out" / "kps.json"
    result = run_kps_cli(
        model,
        adapter_file,
        prompts,
        clip_dir,
        "sks",
        [3],
        STEPS,
        out,
        references=refs,
        grid_path=tmp_path / "grid.png",
        progress=False,
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    total = result["total"]
    for key in ("preservation", "identity", "kps"):
        assert 0.0 < total[key] <= 1.0
    assert total["preservation"] < 1.0  # the adapter is non-zero: its images differ from the base's
    assert -1.0 <= total["prompt_similarity"] <= 1.0
    assert total["kps"] == pytest.approx(harmonic_mean([total["preservation"], total["identity"]]))
    assert result["settings"]["seeds"] == [3] and result["settings"]["references"] == 1
    table = format_kps_table(result)
    assert "a photo of a cat" in table and "a red car" in table and "TOTAL" in table and "prompt sim" in table

    # the same numbers from the pieces: adapter attached by name, images sampled and embedded directly
    encoder = load_clip(clip_dir)
    again = kps_eval(
        _base(("trained", 4)),
        "trained",
        ["a photo of a cat", "a red car"],
        [3],
        "sks",
        encoder,
        read_images(refs),
        steps=STEPS,
    )
    assert again["total"]["kps"] == pytest.approx(total["kps"], abs=1e-4)


def test_run_kps_cli_bad_inputs(kps_files, clip_dir, tmp_path):
    model, adapter_file, prompts = kps_files
    with pytest.raises(CatfastError, match="no such CLIP folder"):
        run_kps_cli(model, adapter_file, prompts, tmp_path / "no-clip", "sks", 1, 1, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing here\n\n")
    with pytest.raises(CatfastError, match="has no prompts"):
        run_kps_cli(model, adapter_file, empty, clip_dir, "sks", 1, 1, progress=False)
    with pytest.raises(CatfastError, match="no such adapter file"):
        run_kps_cli(model, tmp_path / "missing.safetensors", prompts, clip_dir, "sks", 1, 1, progress=False)
    # an adapter made for another model: one layer's input width is wrong
    base = _base(("trained", 4))
    adapter = extract_adapter(base.unet, "trained")
    key = next(iter(adapter.layers))
    layer = adapter.layers[key]
    layers = dict(adapter.layers)
    layers[key] = LoraLayer(down=torch.randn(layer.rank, layer.down.shape[1] + 3), up=layer.up, alpha=layer.alpha)
    misfit = tmp_path / "misfit.safetensors"
    write_adapter(LoraAdapter(layers=layers), misfit)
    out = tmp_path / "kps.json"
    with pytest.raises(CatfastError, match="misfit.safetensors"):
        run_kps_cli(model, misfit, prompts, clip_dir, "sks", 2, 1, out, progress=False)
    assert not out.exists()
