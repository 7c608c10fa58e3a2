"""Caption dropout (`catfast train --caption-dropout P`, kohya's caption_dropout_rate): each sample's diffusion term
sees the empty caption with probability P, its CAT term keeps the stripped caption; drawn from the run's
generator for the whole global batch, so a resumed run is bit for bit the uninterrupted one. On a UNet (the tiny
model) and on a DiT (tiny-flux)."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from catfast.cli import main
from catfast.errors import CatfastError
from catfast.integrations.factory_dit import init_dit_folder
from catfast.integrations.models import load_base
from catfast.testing import make_data
from catfast.train.batches import collate_batch
from catfast.train.config import TrainConfig
from catfast.train.trainer import train
from catfast.train.unet_setup import empty_caption_row

pytestmark = pytest.mark.usefixtures("one_thread")


def config(base, data, out, **overrides) -> TrainConfig:
    values = dict(base=str(base), data=str(data), trigger="sks", out=str(out), steps=4, rank=4, lr=3e-3,
                  checkpoint_every=2, seed=3, batch_size=2)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


class _Rows:
    """Two cached rows as LatentDataset items (UNet: [L, D] states)."""

    def __init__(self, hidden):
        self.hidden = hidden

    def __getitem__(self, key):
        i, _ = key
        return dict(latents=torch.zeros(4, 8, 8), cond=self.hidden[i], cond_stripped=self.hidden[i] + 1,
                    concept=0, example=i, variant=0, bucket=(8, 8))  # fmt: skip


def test_collate_replaces_only_the_dropped_rows_trigger_caption(tiny):
    base = load_base(str(tiny))
    empty = empty_caption_row(base)
    want = base.encode_prompt([""])[0].float()
    assert torch.equal(empty, want)
    hidden = torch.randn(2, *empty.shape)
    batch = collate_batch(_Rows(hidden), [(0, 0), (1, 0)], "cpu", torch.float32, empty=empty, drop=[False, True])
    assert torch.equal(batch["cond"][0], hidden[0]) and torch.equal(batch["cond"][1], empty)
    assert torch.equal(batch["cond_stripped"][1], hidden[1] + 1)  # the CAT term keeps the stripped caption


def test_unet_training_with_caption_dropout_resumes_bit_for_bit(tiny, tmp_path):
    data = make_data(tmp_path / "stars", n=4)
    whole = train(config(tiny, data, tmp_path / "whole", caption_dropout=0.5), progress=False)
    plain = train(config(tiny, data, tmp_path / "plain"), progress=False)
    losses = [json.loads(x)["ldm"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    plain_losses = [json.loads(x)["ldm"] for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert losses != plain_losses  # some rows saw the empty caption
    cut = tmp_path / "cut"
    train(config(tiny, data, cut, steps=3, caption_dropout=0.5), progress=False)
    shutil.rmtree(cut / "checkpoints" / "step-0000003")
    resumed = train(config(tiny, data, cut, caption_dropout=0.5), resume=True, progress=False)
    a, b = load_file(whole.adapters["sks"]), load_file(resumed.adapters["sks"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and plain.adapters


def test_dit_training_with_caption_dropout_resumes_bit_for_bit(tmp_path):
    flux = init_dit_folder("tiny-flux", tmp_path / "flux")
    data = make_data(tmp_path / "stars", n=2)
    dit = dict(resolution=32, alpha=2.0, caption_dropout=0.5)
    whole = train(config(flux, data, tmp_path / "whole", **dit), progress=False)
    plain = train(config(flux, data, tmp_path / "plain", **{**dit, "caption_dropout": 0.0}), progress=False)
    ldm = [json.loads(x)["ldm"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    plain_ldm = [json.loads(x)["ldm"] for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert ldm != plain_ldm and plain.adapters
    cut = tmp_path / "cut"
    train(config(flux, data, cut, steps=3, **dit), progress=False)
    shutil.rmtree(cut / "checkpoints" / "step-0000003")
    resumed = train(config(flux, data, cut, **dit), resume=True, progress=False)
    a, b = load_file(whole.adapters["sks"]), load_file(resumed.adapters["sks"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_caption_dropout_out_of_range_is_one_line(tiny, tmp_path):
    with pytest.raises(CatfastError, match=r"caption_dropout must be in \[0, 1\), got 1.0"):
        config(tiny, tmp_path, tmp_path / "out", caption_dropout=1.0).validate()
    result = CliRunner().invoke(main, ["train", "--base", str(tiny), "--data", str(tmp_path), "--trigger", "sks",
                                       "--out", str(tmp_path / "o"), "--caption-dropout", "1.5"])  # fmt: skip
    assert result.exit_code != 0 and "--caption-dropout" in result.output and "Traceback" not in result.output
    assert "caption_dropout_rate" in CliRunner().invoke(main, ["train", "-h"]).output
