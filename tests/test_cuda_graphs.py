"""catfast train --cuda-graphs: refused with one line where it cannot capture (here: no CUDA; and each dynamic
setting, named), and, wherever CUDA exists, the replayed steps train exactly as eager ones."""

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from catfast.cli import main
from catfast.errors import CatfastError
from catfast.train.graphs import check_graphable, flatten_conditions, unflatten_conditions


def _config(**changes):
    values = dict(mixed_precision="no", lr_schedule="constant", warmup_steps=0, grad_accum=1, bank=None, keep=[],
                  cat_prompts="stripped", mode="fused")  # fmt: skip
    return SimpleNamespace(**{**values, **changes})


def test_refused_without_cuda_in_one_line(tiny, data, tmp_path):
    r = CliRunner().invoke(main, ["train", "--base", str(tiny), "--data", str(data), "--trigger", "sks", "--steps",
                                  "1", "--out", str(tmp_path / "o"), "--device", "cpu", "--cuda-graphs"])  # fmt: skip
    assert r.exit_code != 0
    message = r.output.strip().splitlines()[-1]
    assert "--cuda-graphs needs a CUDA GPU; this run is on cpu" in message and "Traceback" not in r.output


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"mixed_precision": "fp16"}, "mixed_precision fp16"),
        ({"lr_schedule": "cosine"}, "lr_schedule cosine"),
        ({"warmup_steps": 10}, "warmup_steps 10"),
        ({"grad_accum": 2}, "grad_accum 2"),
        ({"bank": "bank/"}, "retention rows"),
        ({"mode": "measure"}, "mode measure"),
    ],
)
def test_each_dynamic_setting_is_named(changes, named):
    with pytest.raises(CatfastError, match="--cuda-graphs cannot capture") as e:
        check_graphable(_config(**changes), torch.device("cuda"), 1, 1)
    assert named in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CatfastError, match="2 processes"):
        check_graphable(_config(), torch.device("cuda"), 2, 1)
    with pytest.raises(CatfastError, match="3 adapters"):
        check_graphable(_config(), torch.device("cuda"), 1, 3)
    check_graphable(_config(), torch.device("cuda"), 1, 1)  # the plain case is accepted


def test_conditions_flatten_and_back():
    cond = {"encoder_hidden_states": torch.randn(1, 3, 4), "added_cond_kwargs": {"text_embeds": torch.randn(1, 8)}}
    flat = flatten_conditions(cond, "cond")
    assert sorted(flat) == ["cond.added.text_embeds", "cond.encoder_hidden_states"]
    back = unflatten_conditions(flat, "cond")
    assert back["added_cond_kwargs"]["text_embeds"] is cond["added_cond_kwargs"]["text_embeds"]
    t = torch.randn(2)
    assert unflatten_conditions(flatten_conditions(t, "c"), "c") is t


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU (benchmarks/gpu.sh)")
def test_graphed_training_equals_eager(tiny, data, tmp_path):
    from catfast.train.config import TrainConfig
    from catfast.train.trainer import train

    runs = {}
    for name, graphs in (("eager", False), ("graphed", True)):
        config = TrainConfig.load(None, dict(base=str(tiny), data=str(data), trigger="sks", steps=6, rank=4, lr=1e-3,
                                             checkpoint_every=0, mode="fused", device="cuda", cuda_graphs=graphs,
                                             out=str(tmp_path / name)))  # fmt: skip
        runs[name] = (train(config, progress=False), tmp_path / name / "metrics.jsonl")
    losses = {n: [json.loads(x)["loss"] for x in p.read_text().splitlines()] for n, (_, p) in runs.items()}
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-4)
    for key, value in runs["eager"][0].lora.items():
        torch.testing.assert_close(runs["graphed"][0].lora[key], value, rtol=1e-4, atol=1e-6)
