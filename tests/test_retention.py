"""Retention (catfast.train.retention, bank, lifelong): the one-call fused loss against plain peft passes,
the bank term against a hand computation, the knowledge bank's files and refusals, kept adapters'
refusals, and `catfast train --bank --cat-prompts --keep` end to end on the tiny model. Every LoRA B is
random (peft's zero B would make the adapter rows equal the teacher's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig

from catfast.errors import AdapterShapeError, CatfastError
from catfast.integrations.factory import build_unet, init_model_folder
from catfast.integrations.models import load_base
from catfast.integrations.schedulers import SCHEDULER_CONFIG
from catfast.testing import assert_rel_close, cat_batch, randomize_lora_
from catfast.train.bank import BankError, load_bank, make_bank
from catfast.train.lifelong import TRIGGER_PROMPTS, KeepError, read_kept
from catfast.train.objective import cat_loss
from catfast.train.retention import Retention, extra_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CATFAST_BACKEND": "torch"}
ENV.pop("TRITON_INTERPRET", None)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet():
    """The tiny UNet with two random adapters, "default" (rank 4) and "other" (rank 2)."""
    unet = build_unet("tiny", seed=0).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=TARGETS))
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4.0, target_modules=TARGETS), adapter_name="other")
    unet.set_adapter(["default", "other"])
    randomize_lora_(unet, seed=3)
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    return unet


def _retention(**kw):
    g = torch.Generator().manual_seed(11)
    probs = torch.arange(1000, 0, -1, dtype=torch.float64)
    full = dict(
        extra_cond=torch.randn(2, 7, 32, generator=g),
        keep_cond=torch.randn(3, 7, 32, generator=g),
        bank_latents=torch.randn(5, 4, 16, 16, generator=g),
        bank_cond=torch.randn(5, 7, 32, generator=g),
        bank_probs=(probs / probs.sum()).float(),
        bank_ratio=0.4,
    )
    return Retention(**{**full, **kw})


def _loss_and_grads(unet, retention, mode, batch, adapters=("default", "other", "default")):
    unet.zero_grad(set_to_none=True)
    loss = retention.loss(
        unet,
        DDPMScheduler(**SCHEDULER_CONFIG),
        **batch,
        adapters=list(adapters),
        generator=torch.Generator().manual_seed(5),
        mode=mode,
    )
    loss.total.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return loss, grads


def test_fused_call_matches_plain_peft_passes():
    """Every row group (concept, stripped, extra prompts, kept prompts, bank) with two adapters in one
    batch: the one row-planned call gives the reference passes' loss terms and LoRA gradients."""
    unet, batch, retention = _unet(), cat_batch(3), _retention()
    ref, ref_grads = _loss_and_grads(unet, retention, "reference", batch)
    fused, fused_grads = _loss_and_grads(unet, retention, "fused", batch)
    for term in ("total", "ldm", "cat", "keep", "bank"):
        assert getattr(ref, term).item() > 0, term
        assert_rel_close(getattr(fused, term), getattr(ref, term), 1e-5, term)
    assert set(fused_grads) == set(ref_grads) and len(ref_grads) > 0
    assert any(".other." in n for n in ref_grads) and any(".default." in n for n in ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        assert_rel_close(fused_grads[name], g, 1e-4, name)


def test_without_extra_rows_it_is_the_cat_loss():
    """No extra, kept or bank rows: the retention step is `cat_loss` (the paper's objective) exactly."""
    unet, batch = _unet(), cat_batch(3)
    plain = Retention()
    for mode in ("reference", "fused"):
        mine, _ = _loss_and_grads(unet, plain, mode, batch)
        theirs = cat_loss(
            unet, DDPMScheduler(**SCHEDULER_CONFIG), **batch, mode=mode, adapters=["default", "other", "default"]
        )
        assert_rel_close(mine.total.detach(), theirs.total.detach(), 1e-5, mode)
        assert_rel_close(mine.cat.detach(), theirs.cat.detach(), 1e-5, mode)
    # the extra prompts change the CAT term: cat = (stripped + extra) / 2
    with_extra, _ = _loss_and_grads(unet, _retention(keep_cond=None, bank_latents=None), "reference", batch)
    assert abs(with_extra.cat.item() - mine.cat.item()) > 1e-6 * mine.cat.item()


def test_bank_term_is_the_true_noise_mse_on_bank_rows():
    """The bank term against a hand computation: the same draws, the adapter's prediction on the noised
    bank latent under its prompt, MSE against the drawn noise; the bank rows' timesteps follow xi(t)."""
    unet, batch = _unet(), cat_batch(2)
    retention = _retention(extra_cond=None, keep_cond=None, cat_weight=0.0, bank_weight=0.3)
    loss, _ = _loss_and_grads(unet, retention, "fused", batch, adapters=("other", "other"))
    nb = retention.bank_rows(2)
    assert nb == 1  # round(2 * 0.4 / 0.6)
    g = torch.Generator().manual_seed(5)
    pick = torch.randint(0, 5, (nb,), generator=g)
    noise = torch.randn((nb, 4, 16, 16), generator=g)
    t = torch.multinomial(retention.bank_probs, nb, replacement=True, generator=g)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    noisy = sched.add_noise(retention.bank_latents[pick], noise, t)
    unet.set_adapter("other")
    with torch.no_grad():
        pred = unet(noisy, t, encoder_hidden_states=retention.bank_cond[pick]).sample
    expected = torch.nn.functional.mse_loss(pred, noise)
    assert_rel_close(loss.bank.detach(), expected, 1e-5, "bank")
    assert_rel_close(loss.total.detach(), loss.ldm.detach() + 0.3 * expected, 1e-5, "total")
    # xi(t) decreasing: over many draws, bank timesteps are mostly on the data side
    draws = torch.multinomial(retention.bank_probs, 4000, replacement=True, generator=g)
    assert (draws < 500).float().mean() > 0.7


def test_cat_prompts_spec(tmp_path):
    assert extra_prompts("stripped") == [] and extra_prompts("stripped+empty") == [""]
    (tmp_path / "p.txt").write_text("a red star\n\n  a ball  \n")
    assert extra_prompts(str(tmp_path / "p.txt")) == ["a red star", "a ball"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CatfastError, match="empty.txt: the --cat-prompts file holds no prompt"):
        extra_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(CatfastError, match="stripped, stripped\\+empty or a prompt file; nope: no such file"):
        extra_prompts("nope")


# ------------------------------------------------------------------------------------------------- bank


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_model_folder("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def bank_dir(tiny, tmp_path_factory):
    base = load_base(tiny)
    return make_bank(
        base, ["a star", "a ball"], 3, tmp_path_factory.mktemp("banks") / "bank", steps=2, guidance=2.0, batch=2
    )


def test_bank_make_records_and_reloads(tiny, bank_dir):
    from catfast.eval.sampler import sample_images

    base = load_base(tiny)
    bank = load_bank(bank_dir, base)
    assert bank.prompts == ["a star", "a ball", "a star"] and bank.seeds == [0, 1, 2]
    assert bank.latents.shape == (3, 4, 16, 16) and bank.latents.std() > 0
    # row 1 is what a one-row sampler run of its prompt and seed gives (batching does not change a row)
    one = sample_images(base, ["a ball"], adapters=[None], seeds=[1], steps=2, guidance=2.0, output="latents")[0]
    assert_rel_close(bank.latents[1], one, 1e-4, "bank row 1")
    assert sorted(p.name for p in bank_dir.iterdir()) == ["latents.safetensors", "manifest.json"]
    # output="latents" is what output="images" decodes
    import numpy as np

    from catfast.eval.sampler import decode_latents

    image = sample_images(base, ["a ball"], adapters=[None], seeds=[1], steps=2, guidance=2.0)[0]
    assert np.array_equal(np.asarray(decode_latents(base, one[None])[0]), np.asarray(image))
    with pytest.raises(ValueError, match="output must be 'images' or 'latents'"):
        sample_images(base, ["a ball"], adapters=[None], seeds=[1], steps=1, output="pixels")


def test_bank_refusals(tiny, bank_dir, tmp_path):
    import shutil

    base = load_base(tiny)
    with pytest.raises(BankError, match="no such bank folder"):
        load_bank(tmp_path / "missing", base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="empty: not a knowledge bank: manifest.json, latents.safetensors missing"):
        load_bank(tmp_path / "empty", base)
    broken = tmp_path / "broken"
    shutil.copytree(bank_dir, broken)
    (broken / "latents.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(BankError, match="broken/latents.safetensors: unreadable bank latents"):
        load_bank(broken, base)
    other = load_base(init_model_folder("tiny", tmp_path / "other", seed=1))
    with pytest.raises(BankError, match="sampled from another base model"):
        load_bank(bank_dir, other)
    with pytest.raises(BankError, match="folder exists and is not empty"):
        make_bank(base, ["a star"], 1, bank_dir, steps=1)


# --------------------------------------------------------------------------------------------- lifelong


def _write(adapter_unet, path: Path, metadata: dict):
    from catfast.adapters.formats import write_adapter
    from catfast.integrations.peft_adapters import extract_adapter

    adapter = extract_adapter(adapter_unet, "default")
    adapter.metadata.update(metadata)
    write_adapter(adapter, path)
    return path


def test_kept_adapter_refusals(tmp_path):
    unet = build_unet("tiny", seed=0)
    src = build_unet("tiny", seed=0)
    src.add_adapter(LoraConfig(r=2, lora_alpha=2.0, target_modules=TARGETS))
    randomize_lora_(src, seed=1)
    good = _write(src, tmp_path / "good.safetensors", {TRIGGER_PROMPTS: json.dumps(["sks, a star"])})
    assert read_kept([good], unet)[0].prompts == ["sks, a star"]
    bare = _write(src, tmp_path / "bare.safetensors", {})
    with pytest.raises(KeepError, match="bare.safetensors: no recorded trigger prompts"):
        read_kept([bare], unet)
    wrong = build_unet("small", seed=0)
    wrong.add_adapter(LoraConfig(r=2, lora_alpha=2.0, target_modules=TARGETS))
    randomize_lora_(wrong, seed=1)
    other = _write(wrong, tmp_path / "other.safetensors", {TRIGGER_PROMPTS: json.dumps(["x, a ball"])})
    with pytest.raises(AdapterShapeError, match="other.safetensors does not fit this unet"):
        read_kept([other], unet)
    with pytest.raises(KeepError, match="missing.safetensors: kept adapter not found"):
        read_kept([tmp_path / "missing.safetensors"], unet)


# ------------------------------------------------------------------------------------------ end to end


def _data(folder: Path, trigger: str, seed: int) -> Path:
    from catfast.train.quickstart import synthetic_image

    folder.mkdir(parents=True)
    for i in range(2):
        synthetic_image(32, seed + i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{trigger}, a star of colour {seed + i}")
    return folder


def _cli(*args):
    """`catfast ARGS` in this process (one thread: the one_thread fixture); returns click's result."""
    from click.testing import CliRunner

    from catfast.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_with_bank_cat_prompts_and_keep(tiny, tmp_path):
    """`catfast bank make`, then a first adapter (which records its trigger prompts), then a second one
    trained with --keep on the first, --bank and --cat-prompts stripped+empty: every term is logged and
    non-zero once the new adapter moved; bad input is refused with one line naming the file, before OUT
    is written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\na ball\n")
    made = _cli(
        "bank", "make", "--base", tiny, "--prompts", prompts, "--n", 2, "--out", tmp_path / "bank", "--steps", 1
    )
    assert made.exit_code == 0, made.output
    common = ["--base", tiny, "--steps", 2, "--rank", 2, "--checkpoint-every", 0, "--no-progress", "--threads", 1]
    first = _cli(
        "train", *common, "--data", _data(tmp_path / "a", "sks", 0), "--trigger", "sks", "--out", tmp_path / "A"
    )
    assert first.exit_code == 0, first.output
    a = tmp_path / "A" / "adapter.safetensors"
    from catfast.adapters.formats import read_adapter

    assert json.loads(read_adapter(a).metadata[TRIGGER_PROMPTS]) == [
        "sks, a star of colour 0",
        "sks, a star of colour 1",
    ]
    data_b = _data(tmp_path / "b", "zwx", 5)
    args = [*common, "--data", data_b, "--trigger", "zwx", "--keep", a, "--bank", tmp_path / "bank"]
    second = _cli("train", *args, "--cat-prompts", "stripped+empty", "--mode", "fused", "--out", tmp_path / "B")
    assert second.exit_code == 0, second.output
    lines = [json.loads(x) for x in (tmp_path / "B" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["bank"] > 0  # step 1: B = 0, so only the data terms are non-zero
    assert lines[1]["keep"] > 0 and lines[1]["bank"] > 0 and lines[1]["cat"] > 0
    for bad, message in (
        (["--bank", tmp_path / "nobank"], "nobank: no such bank folder"),
        (["--keep", tmp_path / "B" / "metrics.jsonl"], "metrics.jsonl"),
        (["--cat-prompts", tmp_path / "none.txt"], "none.txt: no such file"),
    ):
        out = tmp_path / f"bad{len(message)}"
        result = _cli("train", *common, "--data", data_b, "--trigger", "zwx", *bad, "--out", out)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
        assert not (out / "config.json").exists()


# ----------------------------------------------------------------------------------------------- demo


def test_demo_compare_small(tmp_path):
    """`catfast demo --compare` at a tiny budget: every method trained through the trainer (the bank made,
    the lifelong keep run on CAT's adapter, which recorded its prompts), scored, one grid each, and the
    --json summary holds one object per method with the four numbers."""
    from PIL import Image

    from catfast.demo.compare import COMPARE, format_compare, run_compare, summary

    methods = list(COMPARE)
    result = run_compare(tmp_path / "demo", methods, seeds=2, steps=2, sample_steps=2, progress=False, log=lambda *_: 0)
    line = json.loads(json.dumps(summary(result)))
    for name in ("plain", "cat", "cat-guidance", "bank", "lifelong"):
        for key in ("preservation", "identity", "diversity", "kps"):
            assert 0 <= line[name][key] <= 1, (name, key)
    assert set(line["lifelong"]["variants"]) == {"plain", "cat", "keep"}
    assert line["lifelong"]["kps"] == line["lifelong"]["variants"]["keep"]["kps"]
    for name in methods:
        with Image.open(result["grids"][name]) as grid:
            assert grid.width > 0
    # the knowledge bank and the bank-trained adapter's output are separate folders
    bank = tmp_path / "demo" / "knowledge-bank"
    assert {p.name for p in bank.iterdir()} == {"latents.safetensors", "manifest.json"}
    assert "cat-guidance" in format_compare(result)
    bad = _cli("demo", "--compare", "cat,nope", "--out", tmp_path / "x")
    assert bad.exit_code == 1 and "--compare takes a comma-separated list" in bad.output
