"""`catfast train` under torchrun: 2 CPU processes (gloo) end with identical adapters that match a
1-process run with the same global batch. Five images in global batches of 4 give the batches 4 and 1:
an even split, then a rank with nothing to do (it computes a sample with weight 0)."""

import json

import torch
from safetensors.torch import load_file

from catfast.integrations.factory import init_model_folder
from catfast.testing import assert_rel_close, train_two_ranks_and_one
from catfast.train.quickstart import synthetic_image


def test_torchrun_two_ranks_match_one_process(tmp_path):
    base = init_model_folder("tiny", tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        synthetic_image(32, i).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"sks, a star of colour {i}")
    settings = dict(base=str(base), data=str(data), trigger="sks", steps=3, rank=4, lr=1e-3, seed=3, checkpoint_every=0)
    # CATFAST_CONV=native: each process would time its own convolution algorithms (ranks at batch 2, the
    # single process at 4), and Adam turns their rounding differences into ~1e-4 (one CI run: 1.2e-4)
    env = {"CATFAST_BACKEND": "torch", "CATFAST_CONV": "native"}
    rank0, rank1, one = train_two_ranks_and_one(settings, tmp_path, env)
    assert rank0.keys() == rank1.keys() == one.lora.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ at {name}"
        # Adam divides by sqrt(v): the gradients' rounding (two half-batch means all-reduced vs one mean)
        # reaches the weights at ~1e-5 relative after a few steps
        assert_rel_close(rank0[name], one.lora[name], 1e-4, f"2 ranks vs 1 process: {name}")
    assert any(t.abs().max() > 0 for name, t in rank0.items() if "lora_B" in name)

    # rank 0 wrote the run's files; the logged loss is the global batch's
    written = load_file(tmp_path / "two" / "adapter.safetensors")
    assert len(written) == len(rank0)
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    for a, b in zip(logged, ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
