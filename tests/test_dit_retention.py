"""`--keep` and `--cat-prompts` on a DiT (train/flow_held.py): a second adapter trained while keeping the first on
tiny-flux records the keep term and an extra-prompt CAT term, resumes bit for bit (the held prompts are drawn
from the run's generator), and its teacher is base + kept adapter, merged as diffusers' ``fuse_lora`` merges it;
bad kept files are one line before OUT changes."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from catfast.adapters.formats import read_adapter, write_adapter
from catfast.errors import CatfastError
from catfast.integrations.factory_dit import init_dit_folder
from catfast.testing import assert_rel_close, make_data, random_adapter
from catfast.train.config import TrainConfig
from catfast.train.flow_held import HeldPrompts
from catfast.train.lifelong import TRIGGER_PROMPTS
from catfast.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return init_dit_folder("tiny-flux", tmp_path_factory.mktemp("dit") / "tiny-flux")


@pytest.fixture(scope="module")
def first(flux, tmp_path_factory):
    """An adapter trained by catfast on tiny-flux with trigger "sks" (its trigger prompts in its metadata)."""
    root = tmp_path_factory.mktemp("first")
    result = train(config(flux, make_data(root / "stars"), root / "out", trigger="sks"), progress=False)
    return result.adapters["sks"]


def config(base, data, out, **overrides) -> TrainConfig:
    values = dict(base=str(base), data=str(data), trigger="tok", out=str(out), steps=3, rank=4, alpha=2.0,
                  lr=3e-3, checkpoint_every=0, resolution=32, seed=5)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_keep_and_extra_cat_prompts_train_resume_bit_for_bit(flux, first, tmp_path):
    data = make_data(tmp_path / "toks", trigger="tok", n=2)
    held = dict(keep=[str(first)], cat_prompts="stripped+empty")
    whole = train(config(flux, data, tmp_path / "whole", steps=4, checkpoint_every=2, **held), progress=False)
    lines = metrics(tmp_path / "whole")
    assert all("keep" in r for r in lines) and lines[0]["keep"] == 0.0  # step 1: the new LoRA's B is zero
    assert all(r["keep"] > 0 and r["cat"] > 0 for r in lines[1:])  # held prompts moved once the LoRA moved
    cut = tmp_path / "cut"
    train(config(flux, data, cut, steps=3, checkpoint_every=2, **held), progress=False)
    shutil.rmtree(cut / "checkpoints" / "step-0000003")
    resumed = train(config(flux, data, cut, steps=4, checkpoint_every=2, **held), resume=True, progress=False)
    assert resumed.start_step == 2
    a, b = load_file(whole.adapters["tok"]), load_file(resumed.adapters["tok"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["keep"] for r in metrics(cut)] == [r["keep"] for r in lines]
    # the same run without --keep and extra prompts: other losses from step 2 (the held rows are in the loss)
    plain = train(config(flux, data, tmp_path / "plain", steps=4), progress=False)
    assert metrics(tmp_path / "plain")[0]["loss"] != lines[0]["loss"]  # the teacher is base + kept, not base
    assert "keep" not in metrics(tmp_path / "plain")[0] and plain.adapters


def test_the_kept_teacher_is_base_plus_kept_as_diffusers_fuses_it(flux, first):
    pipe = FluxPipeline.from_pretrained(flux, local_files_only=True)
    pipe.load_lora_weights(str(first), adapter_name="kept")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay
    fused = pipe.transformer.state_dict()
    own = FluxPipeline.from_pretrained(flux, local_files_only=True).transformer
    HeldPrompts.read(config(flux, "unused", "unused", keep=[str(first)])).merge_kept(own)
    changed = 0
    for name, weight in own.state_dict().items():
        assert_rel_close(weight, fused[name], 1e-6, name)
        changed += not torch.equal(weight, FluxPipeline.from_pretrained(flux, local_files_only=True).transformer
                                   .state_dict()[name]) if name.endswith("to_q.weight") else 0  # fmt: skip
    assert changed > 0  # the merge changed the weights the kept adapter targets


def test_bad_kept_files_are_one_line_before_out_changes(flux, first, tiny, tmp_path):
    data = make_data(tmp_path / "toks", trigger="tok", n=1)
    unet_lora = tmp_path / "unet.safetensors"
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    write_adapter(random_adapter({"unet": unet}, leaves=("to_q",)), unet_lora)
    silent = tmp_path / "silent.safetensors"
    adapter = read_adapter(first)
    adapter.metadata.pop(TRIGGER_PROMPTS)
    write_adapter(adapter, silent)
    for keep, words in ((unet_lora, "transformer layers only"), (silent, "no recorded trigger prompts"),
                        (tmp_path / "missing.safetensors", "not found")):  # fmt: skip
        with pytest.raises(CatfastError) as e:
            train(config(flux, data, tmp_path / "out", keep=[str(keep)]), progress=False)
        assert words in str(e.value) and str(keep) in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(CatfastError, match="not a knowledge bank"):  # --bank is built: a folder that is no bank
        train(config(flux, data, tmp_path / "out", bank=str(tmp_path)), progress=False)


@pytest.mark.parametrize("layout", ["one-call", "teacher-first"])
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-qwenimage"])
def test_bank_rows_fused_equal_reference(name, layout):
    """Bank rows (their own latents, noise, sigmas and captions; the true velocity as target) ride in the fused
    step's call beside the CAT and held rows: loss, bank term and LoRA gradients equal the reference's separate
    calls (Qwen-Image: bank captions of another length, padded with the mask)."""
    from catfast.testing import lora_transformer
    from catfast.train.flow_objective import BankRows, flow_cat_loss, sample_flow_inputs

    family, model, _ = lora_transformer(name)
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, family.latent_channels(model), 8, 8, generator=g)
    noise, sigmas = sample_flow_inputs(family, latents, generator=g)
    cond, stripped, extra = (family.example_cond(model, 2, 7, g) for _ in range(3))
    bank_latents = torch.randn(3, *latents.shape[1:], generator=g)
    bank_noise, bank_sigmas = sample_flow_inputs(family, bank_latents, generator=g)
    length = 5 if family.name == "qwenimage" else 7  # Flux's T5 states are padded to one length
    bank = BankRows(bank_latents, bank_noise, bank_sigmas, family.example_cond(model, 3, length, g), 0.4)
    runs = {}
    for mode, lay in (("reference", "one-call"), ("fused", layout)):
        for p in model.parameters():
            p.grad = None
        out = flow_cat_loss(family, model, latents, noise, sigmas, cond, stripped, cat_weight=0.7,
                            preserve=[(extra, 0.5)], bank=bank, mode=mode, layout=lay)  # fmt: skip
        out.loss.backward()
        runs[mode] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref, ref_grads), (fused, fused_grads) = runs["reference"], runs["fused"]
    assert ref.bank > 0
    assert_rel_close(ref.loss.detach(), ref.ldm + 0.7 * ref.cat + 0.5 * ref.preserved[0] + 0.4 * ref.bank, 1e-6, "sum")
    assert_rel_close(fused.loss, ref.loss, 1e-5, "loss")
    assert_rel_close(fused.bank, ref.bank, 1e-5, "bank term")
    assert sorted(fused_grads) == sorted(ref_grads) and ref_grads
    for n, grad in ref_grads.items():
        assert_rel_close(fused_grads[n], grad, 1e-5, n)


def test_bank_make_on_a_dit_and_train_with_it(flux, tmp_path):
    from click.testing import CliRunner

    from catfast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue box on a green background\n")
    bank = tmp_path / "bank"
    args = ["bank", "make", "--base", str(flux), "--prompts", str(prompts), "--n", "3", "--out", str(bank), "--steps",
            "2", "--size", "32", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["n"] == 3 and manifest["size"] == 32 and manifest["sampler"] == "flow-euler"
    data = make_data(tmp_path / "toks", trigger="tok", n=2)
    train(config(flux, data, tmp_path / "out", bank=str(bank), bank_weight=0.5), progress=False)
    lines = metrics(tmp_path / "out")
    assert all(r["bank"] > 0 for r in lines)  # the replayed rows' velocity error, from step 1
    # a bank at another size, or of another pipeline: one line before OUT changes
    small = tmp_path / "small"
    small_args = [str(small) if a == str(bank) else "16" if a == "32" else a for a in args]
    assert CliRunner().invoke(main, small_args).exit_code == 0
    other = init_dit_folder("tiny-flux", tmp_path / "other", seed=1)
    for folder, words in ((small, "catfast bank make --size"), (bank, "another base model")):
        base = other if folder == bank else flux
        with pytest.raises(CatfastError) as e:
            train(config(base, data, tmp_path / "bad", bank=str(folder)), progress=False)
        assert words in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "bad" / "config.json").exists()
