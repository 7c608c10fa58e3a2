"""`catfast train` under torchrun: 2 CPU processes (gloo) end with identical adapters that match a
1-process run with the same global batch. Five images in global batches of 4 give the batches 4 and 1:
an even split, then a rank with nothing to do (it computes a sample with weight 0)."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from catfast.integrations.factory import init_model_folder
from catfast.testing import assert_rel_close
from catfast.train.config import TrainConfig
from catfast.train.quickstart import synthetic_image
from catfast.train.trainer import train

# Runs train(config) and saves this rank's final LoRA parameters (rank 0 also writes OUT as usual).
SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from catfast.train.config import TrainConfig
from catfast.train.trainer import train

result = train(TrainConfig.load(None, json.loads(sys.argv[1])), progress=False)
path = os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors")
save_file({k: v.contiguous() for k, v in result.lora.items()}, path)
"""


def test_torchrun_two_ranks_match_one_process(tmp_path, monkeypatch):
    base = init_model_folder("tiny", tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        synthetic_image(32, i).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"sks, a star of colour {i}")
    settings = dict(base=str(base), data=str(data), trigger="sks", steps=3, rank=4, lr=1e-3, seed=3, checkpoint_every=0)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    # CATFAST_CONV=native: each process would time its own convolution algorithms (ranks at batch 2, the
    # single process at 4), and Adam turns their rounding differences into ~1e-4 (one CI run: 1.2e-4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CATFAST_BACKEND": "torch", "CATFAST_CONV": "native"}
    env.pop("TRITON_INTERPRET", None)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    two = {**settings, "out": str(tmp_path / "two"), "batch_size": 2}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, str(script), json.dumps(two), str(ranks)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    # meanwhile, one process with the global batch of 4
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    monkeypatch.setenv("CATFAST_CONV", "native")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(TrainConfig.load(None, {**settings, "out": str(tmp_path / "one"), "batch_size": 4}), progress=False)
    finally:
        torch.set_num_threads(threads)

    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun timed out:\n{output.decode()}") from None
    assert proc.returncode == 0, output.decode()

    rank0, rank1 = load_file(ranks / "rank0.safetensors"), load_file(ranks / "rank1.safetensors")
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
