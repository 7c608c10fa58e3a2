"""`catfast train` on a DiT base under torchrun: 2 CPU processes (gloo) end with identical LoRA weights that match
a 1-process run with the same global batch (the fused flow CAT step, tiny-flux). Five images in global batches of 4
give the batches 4 and 1: an even split, then a rank with nothing to do (it computes a sample with weight 0)."""

import json

import torch
from safetensors.torch import load_file

from catfast.integrations.factory_dit import init_dit_folder
from catfast.testing import assert_rel_close, make_data, train_two_ranks_and_one


def test_torchrun_two_ranks_match_one_process_on_a_dit(tmp_path):
    base = init_dit_folder("tiny-flux", tmp_path / "flux")
    data = make_data(tmp_path / "data", n=5)
    settings = dict(base=str(base), data=str(data), trigger="sks", steps=3, rank=4, lr=1e-3, seed=3,
                    checkpoint_every=0, resolution=32)  # fmt: skip
    # the row-planned op's torch backend in both runs, as the tests' one_thread fixture sets
    rank0, rank1, one = train_two_ranks_and_one(settings, tmp_path, {"CATFAST_BACKEND": "torch"})
    assert rank0.keys() == rank1.keys() == one.lora.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ at {name}"
        # Adam divides by sqrt(v): two half-batch means all-reduced against one mean differ in rounding only
        assert_rel_close(rank0[name], one.lora[name], 1e-4, f"2 ranks vs 1 process: {name}")
    assert any(t.abs().max() > 0 for name, t in rank0.items() if "lora_B" in name)

    # rank 0 wrote the run's files; the logged loss is the global batch's
    assert load_file(tmp_path / "two" / "adapter.safetensors").keys()
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3] and logged[0]["mode"] == "fused"
    for a, b in zip(logged, ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
