"""E4T on the demo world (catfast/e4t): pre-training, personalization, the embedding in serving, sampling
and ONNX export, and bad input. Real models (the shipped demo model and E4T files), tiny budgets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from catfast.adapters.formats import read_adapter
from catfast.demo import world
from catfast.e4t import concepts as cc
from catfast.e4t.model import ASSETS, DOMAIN_FILE, ENCODER_FILE, check_shipped, load_encoder
from catfast.e4t.personalize import TuneSettings, personalize
from catfast.errors import CatfastError
from catfast.integrations.models import load_base
from catfast.integrations.word_embedding import (
    EMBEDDING_KEY,
    encode,
    injected,
    install_embedding,
    read_embedding,
    single_token,
    token_table,
)
from catfast.shipped import model_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return load_base(model_path())


@pytest.fixture(scope="module")
def star_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("e4t-image") / "star.png"
    world.render(cc.reference_views(cc.NAMED_HELD_OUT["striped-star"])[0]).save(path)
    return path


@pytest.fixture(scope="module")
def tuned(base, star_png, tmp_path_factory):
    """A 3-step E4T adapter and a 0-step one of the held-out striped star."""
    out = tmp_path_factory.mktemp("e4t-adapters")
    r3 = personalize(star_png, "star", out, name="three", settings=TuneSettings(steps=3), base=base)
    r0 = personalize(star_png, "star", out, name="zero", settings=TuneSettings(steps=0), base=base)
    return out, r3, r0


def test_held_out_concepts_are_never_training_concepts():
    train, held = cc.split()
    assert len(train) + len(held) == len(cc.all_concepts()) == 810
    assert not set(train) & set(held)
    assert set(cc.NAMED_HELD_OUT.values()) <= set(held)


def test_injected_embedding_equals_that_row_in_the_table_and_carries_gradients(base):
    sks = single_token(base.tokenizer, "sks")
    v = (torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.2).requires_grad_(True)
    got = encode(base, ["sks, a star", "a star"], sks, v)
    got[0].sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    weight, row, previous = install_embedding(base.text_encoder, base.tokenizer, "sks", v.detach())
    try:
        with torch.no_grad():
            want = encode(base, ["sks, a star", "a star"])
    finally:
        with torch.no_grad():
            weight[row] = previous
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    with torch.no_grad():
        plain = encode(base, ["sks, a star"])
    assert (plain[0] - want[0]).abs().max() > 1e-3  # the embedding changes the condition
    with injected(base.text_encoder, sks, v.detach()):  # a prompt without the word is untouched
        torch.testing.assert_close(encode(base, ["a star"]), want[1:], rtol=0, atol=0)


def test_pretrain_tiny_budget_writes_loadable_checked_files(tmp_path):
    from catfast.e4t.pretrain import pretrain

    out = pretrain(
        tmp_path / "assets", steps=2, pool_concepts=6, prior_images=8, warmup=1, command="test", log=lambda m: None
    )
    record = json.loads((out / "pretrain.json").read_text())
    assert record["command"] == "test" and record["settings"]["steps"] == 2
    assert "large-yellow-star-purple-stripes" in record["held_out"]
    check_shipped(out)  # the manifest matches
    encoder = load_encoder(out / ENCODER_FILE)
    assert encoder(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
    domain = read_adapter(out / DOMAIN_FILE)
    unet = load_base(model_path()).unet
    targets = [n for n, _ in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert sorted(domain.layers) == sorted(f"unet.{n}" for n in targets)  # every attention projection
    assert all(layer.up.dtype == torch.float16 for layer in domain.layers.values())
    assert max(float(layer.up.abs().max()) for layer in domain.layers.values()) > 0  # trained away from B = 0


def test_shipped_files_match_their_manifest_and_record():
    root = check_shipped()
    record = json.loads((root / "pretrain.json").read_text())
    assert record["command"].startswith("OMP_NUM_THREADS=1 python -m catfast.e4t.pretrain")
    assert (root / ENCODER_FILE).stat().st_size < 1_000_000 and (root / DOMAIN_FILE).stat().st_size < 300_000


def test_personalize_tunes_embedding_and_offsets(tuned, base):
    out, r3, r0 = tuned
    a3, a0 = read_adapter(r3.adapter), read_adapter(r0.adapter)
    tok3, v3 = read_embedding(a3.metadata)
    tok0, v0 = read_embedding(a0.metadata)
    assert tok3 == tok0 == "sks" and v3.shape == (64,)
    assert (v3 - v0).abs().max() > 1e-5  # tuning moved v*
    domain = read_adapter(ASSETS / DOMAIN_FILE)
    key = next(iter(domain.layers))
    torch.testing.assert_close(a0.layers[key].up, domain.layers[key].up.float())  # 0 steps: the domain offsets
    assert (a3.layers[key].up - a0.layers[key].up).abs().max() > 0  # tuned
    assert len(r3.losses) == 3 and r0.losses == []
    record = json.loads((out / "three.json").read_text())
    assert record["settings"]["steps"] == 3 and record["seconds"] > 0
    # the base is left as it was: no adapter on the UNet, the token table unchanged
    assert not getattr(base.unet, "peft_config", None)
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_sampler_and_serve_apply_the_embedding_per_request(tuned, base):
    from catfast.eval.sampler import sample_images
    from catfast.integrations.peft_adapters import _remove, attach_adapter
    from catfast.integrations.word_embedding import install_from_metadata
    from catfast.serve.engine import Engine

    out, r3, _ = tuned
    adapter = read_adapter(r3.adapter)
    kw = dict(steps=3, guidance=5.0)
    saved = install_from_metadata(base.text_encoder, base.tokenizer, adapter.metadata)
    attach_adapter(base.unet, adapter, "e4t")
    try:
        want = sample_images(base, ["sks, a star"], adapters=["e4t"], seeds=[3], **kw)[0]
    finally:
        _remove(base.unet, "e4t", had_peft=False)
        weight, row, previous = saved
        with torch.no_grad():
            weight[row] = previous
    with Engine("demo", adapters_dir=out) as engine:
        engine.load_adapter("three")
        got = engine.generate("sks, a star", adapters={"three": 1.0}, seed=3, **kw)[0]
        base_req = engine.generate("sks, a star", seed=3, **kw)[0]
    plain = sample_images(base, ["sks, a star"], adapters=[None], seeds=[3], **kw)[0]
    a, b = np.asarray(got, dtype=int), np.asarray(want, dtype=int)
    assert np.abs(a - b).max() <= 2, np.abs(a - b).max()
    # the base request in the same engine did not get the concept's embedding
    assert np.abs(np.asarray(base_req, dtype=int) - np.asarray(plain, dtype=int)).max() <= 2
    assert np.abs(a - np.asarray(plain, dtype=int)).max() > 10


def test_export_onnx_carries_the_embedding_in_the_text_encoder(tuned, base, tmp_path):
    import onnxruntime as ort

    from catfast.export.onnx import export_onnx

    _, r3, _ = tuned
    token, vector = read_embedding(read_adapter(r3.adapter).metadata)
    before = token_table(base.text_encoder).weight.detach().clone()
    manifest = export_onnx(base, tmp_path / "x", adapters=[f"e4t={r3.adapter}"], components=["unet", "text_encoder"])
    assert manifest["components"]["text_encoder"]["validation"]["max_rel_err"] <= 1e-4
    torch.testing.assert_close(token_table(base.text_encoder).weight, before, rtol=0, atol=0)  # restored
    ids = base.tokenizer(["sks, a star"], padding="max_length", max_length=77, return_tensors="np").input_ids
    session = ort.InferenceSession(str(tmp_path / "x" / manifest["components"]["text_encoder"]["file"]))
    got = session.run(None, {"input_ids": ids.astype(np.int64)})[0]
    with torch.no_grad():
        want = encode(base, ["sks, a star"], single_token(base.tokenizer, token), vector)
        plain = encode(base, ["sks, a star"])
    assert np.abs(got - want.numpy()).max() < 1e-4
    assert np.abs(got - plain.numpy()).max() > 1e-3


def test_bad_pictures_words_and_files(base, star_png, tmp_path):
    from PIL import Image

    rgba = tmp_path / "rgba.png"
    Image.open(star_png).convert("RGBA").resize((64, 64)).save(rgba)
    r = personalize(rgba, "star", tmp_path / "o", settings=TuneSettings(steps=0), base=base)
    assert any("mode RGBA" in n for n in r.notes) and any("resized from 64x64" in n for n in r.notes)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (48, 32)).save(wide)
    with pytest.raises(CatfastError, match="48x32 pixels.*square"):
        personalize(wide, "star", tmp_path / "x", base=base)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(CatfastError, match="junk.png: cannot decode image"):
        personalize(junk, "star", tmp_path / "x", base=base)
    with pytest.raises(CatfastError, match="'striped' is not one token.*splits into"):
        personalize(star_png, "striped", tmp_path / "x", base=base)
    with pytest.raises(CatfastError, match="placeholder word 'sks x' must be one word"):
        personalize(star_png, "star", tmp_path / "x", token="sks x", base=base)
    with pytest.raises(CatfastError, match="e4t-star.safetensors: exists.*--overwrite"):
        personalize(star_png, "star", tmp_path / "o", name="e4t-star", settings=TuneSettings(steps=0), base=base)
    # a damaged shipped encoder: named by the manifest check, and by the loader itself
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets)
    data = bytearray((assets / ENCODER_FILE).read_bytes())
    data[-10:] = b"\x00" * 10
    (assets / ENCODER_FILE).write_bytes(bytes(data))
    with pytest.raises(CatfastError, match=f"{ENCODER_FILE}: damaged file.*checksum"):
        personalize(star_png, "star", tmp_path / "o2", assets=assets, base=base)
    (assets / ENCODER_FILE).write_bytes(bytes(data[:100]))
    with pytest.raises(CatfastError, match=f"{ENCODER_FILE}: the E4T image encoder is damaged"):
        load_encoder(assets / ENCODER_FILE)
    bad = {"catfast.e4t.token": "sks", EMBEDDING_KEY: "[1, 2, "}
    with pytest.raises(CatfastError, match="damaged E4T embedding"):
        read_embedding(bad, "x.safetensors")


def test_cli_personalize_prints_time_and_refuses_in_one_line(star_png, tmp_path):
    from catfast.cli import main

    result = CliRunner().invoke(
        main, ["personalize", "--image", str(star_png), "--class", "star", "--out", str(tmp_path), "--steps", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "personalized in" in result.output and (tmp_path / "e4t-star.safetensors").is_file()
    bad = CliRunner().invoke(
        main, ["personalize", "--image", str(star_png), "--class", "striped", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    errors = [
        line for line in bad.output.splitlines() if line.startswith("Error:")
    ]  # (a busy-machine note may precede)
    assert len(errors) == 1 and "class word 'striped' is not one token" in errors[0]


def test_measure_pairs_rows_by_concept_and_seed(tmp_path):
    """The paired table subtracts CAT-300 of the SAME concept and seed (a base row: of every seed)."""
    from catfast.e4t.results import format_paired, read_results

    def row(concept, seed, method, steps, identity, preservation=0.9):
        kps = 2 * identity * preservation / (identity + preservation)
        return dict(
            concept=concept,
            seed=seed,
            method=method,
            steps=steps,
            identity=identity,
            preservation=preservation,
            kps=kps,
        )

    rows = [
        row("a", None, "base", 0, 0.5),
        row("a", 0, "cat", 300, 0.7),
        row("a", 1, "cat", 300, 0.9),
        row("b", 0, "cat", 300, 0.2),
        row("a", 0, "e4t", 15, 0.8, 0.8),
        row("a", 1, "e4t", 15, 0.8, 0.8),
        row("b", 0, "e4t", 15, 0.1, 0.8),
    ]
    lines = {ln.split("|")[1].strip(): ln for ln in format_paired(rows).splitlines()[2:]}
    # e4t: +0.1, -0.1, -0.1 -> mean -0.033, sd 0.1155, se 0.0667; preservation -0.1 each (se 0); 1 of 3 at or above
    assert "| -0.033 +- 0.067 (-0.100 to +0.100) | -0.100 +- 0.000 |" in lines["e4t"]
    assert lines["e4t"].endswith("| 1 of 3 |")
    # base pairs with both seeds of concept a: -0.2, -0.4 (se 0.1)
    assert "| -0.300 +- 0.100 (-0.400 to -0.200) | +0.000 +- 0.000 |" in lines["base"]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"header": True}, *rows]) + "\n")
    header, back = read_results(path)
    assert header == {"header": True} and back == rows
