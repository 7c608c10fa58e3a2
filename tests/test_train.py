"""`catfast train` end to end on the tiny model: a real CLI process killed after a checkpoint and resumed
ends with the adapter of an uninterrupted run; metrics, loss plot, sample grids and the adapter that
diffusers loads; multi-concept + kohya; config files; atomic checkpoints under a failing disk; bad input.

Every training process runs with one thread: on a shared 2-core machine two OpenMP threads make a tiny
step 40x slower, and one thread keeps the float sums in a fixed order (resume must match to ~1e-6)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from catfast.cli import main
from catfast.errors import CatfastError
from catfast.testing import assert_rel_close, make_data, train_state
from catfast.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from catfast.train.config import ConfigError, TrainConfig
from catfast.train.trainer import train

# CATFAST_CONV=native: the per-shape convolution choice (catfast.ops.conv) is timed in each process, like
# cudnn.benchmark, so two processes may round differently; the resume test compares two processes to 1e-6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CATFAST_BACKEND": "torch", "CATFAST_CONV": "native"}
ENV.pop("TRITON_INTERPRET", None)  # the trainer's CPU path is torch; the kernels have their own tests


def cli(*args, timeout=180):
    return subprocess.Popen(
        [sys.executable, "-m", "catfast.cli", "train", *map(str, args), "--no-progress"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=180):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"catfast train timed out:\n{out}\n{err}") from None
    assert proc.returncode == 0, f"catfast train failed ({proc.returncode}):\n{out}\n{err}"
    return out


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@torch.no_grad()
def unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    return unet(x, torch.tensor([500]), c).sample


# ------------------------------------------------------------------------------------------ end to end


def test_cli_kill_resume_matches_uninterrupted_run_and_diffusers_loads_it(tiny, data, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        f'base = "{tiny}"\ndata = "{data}"\ntrigger = "sks"\nsteps = 1000\nrank = 4\nlr = 1e-3\n'
        "checkpoint_every = 2\nkeep_checkpoints = 2\nbatch_size = 2\ncrop_variants = 2\nseed = 7\n"
        "sample_steps = 2\n"
    )
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    # 1. a real process, SIGKILLed once a checkpoint is on disk (--steps on the command line beats the file)
    proc = cli("--config", config, "--out", killed, "--steps", 500)
    deadline = time.monotonic() + 120
    while not list_checkpoints(killed / "checkpoints"):
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    k = list_checkpoints(killed / "checkpoints")[-1][0]
    steps = k + 3

    # 2. resume it, and (concurrently) an uninterrupted run that also writes samples
    resumed = cli("--config", config, "--out", killed, "--steps", steps, "--resume")
    uninterrupted = cli("--config", config, "--out", whole, "--steps", steps, "--sample-every", 2)
    out_resumed, out_whole = finish(resumed), finish(uninterrupted)
    assert f"wrote adapter to {killed / 'adapter.safetensors'}" in out_resumed
    assert f"trained {steps} steps" in out_whole

    a, b = adapter_tensors(killed / "adapter.safetensors"), adapter_tensors(whole / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert_rel_close(a[key], b[key], 1e-6, f"resumed vs uninterrupted {key}")
    assert max(t.abs().max().item() for key, t in b.items() if "lora_B" in key) > 0  # it trained

    # metrics: one line per step (the killed run's lines past its checkpoint are gone), same losses
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in ref] == list(range(1, steps + 1))
    assert set(ref[0]) == {"step", "loss", "ldm", "cat", "lr", "seconds", "mode", "mode_reason"}
    # mode "auto" on a CPU: the tiny UNet runs fused at 1 thread, the reference at more (test_objective)
    assert ref[0]["mode"] in ("fused", "reference") and "on the CPU at" in ref[0]["mode_reason"]
    assert all(set(r) == set(ref[0]) - {"mode_reason"} for r in ref[1:])
    for r, s in zip(lines, ref):
        assert abs(r["loss"] - s["loss"]) <= 1e-5 * abs(s["loss"]), (r, s)
    assert json.loads((whole / "config.json").read_text())["steps"] == steps
    for png in [whole / "loss.png", *sorted((whole / "samples").glob("*.png"))]:
        assert Image.open(png).size[0] > 32
    assert sorted(p.name for p in (whole / "samples").iterdir()) == [
        f"step-{s:07d}.png" for s in range(2, steps + 1, 2)
    ] + ([f"step-{steps:07d}.png"] if steps % 2 else [])

    # the adapter loads in diffusers as is and changes its UNet's output
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True, safety_checker=None)
    before = unet_out(pipe.unet)
    pipe.load_lora_weights(str(whole / "adapter.safetensors"), adapter_name="cat")
    assert (unet_out(pipe.unet) - before).abs().max() > 1e-6

    # 3. resuming with a setting that changes the result is refused, naming it; checkpoints stay
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--config", str(config), "--out", str(killed), "--resume", "--lr", "0.01"])
    assert r.exit_code == 1 and "lr: 0.001 -> 0.01" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["train", "--config", str(config), "--out", str(killed), "--resume", "--steps", "2"])
    assert r.exit_code == 1 and "and steps is 2; raise --steps" in r.output
    assert list_checkpoints(killed / "checkpoints")


def test_multi_concept_adapters_kohya_format_load_in_diffusers(tiny, tmp_path, one_thread):
    """Two concepts, one adapter each, in one run; each kohya file gives diffusers the trained UNet."""
    from diffusers import StableDiffusionPipeline

    from catfast.integrations.models import load_base
    from catfast.integrations.peft_adapters import add_lora

    cat, dog = make_data(tmp_path / "cat", "ccx", 2), make_data(tmp_path / "dog", "ddx", 2, seed=5)
    config = TrainConfig.load(
        None,
        {
            "base": str(tiny),
            "concepts": [{"data": str(cat), "trigger": "ccx"}, {"data": str(dog), "trigger": "ddx"}],
            "out": str(tmp_path / "out"),
            "steps": 3,
            "batch_size": 2,
            "rank": 2,
            "alpha": 4,
            "lr": 1e-2,
            "format": "kohya",
            "lr_schedule": "cosine",
            "warmup_steps": 1,
            "timesteps": "chain-of-forgetting",
            "snr_gamma": 5.0,
            "center_crop": True,
            "random_flip": False,
        },
    )
    result = train(config, progress=False)
    assert set(result.adapters) == {"ccx", "ddx"}
    assert result.adapters["ccx"].name == "adapter-ccx.safetensors"
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2) and lrs[2] < 1e-2  # warmup, cosine

    for k, trigger in enumerate(("ccx", "ddx")):
        name = f"concept{k}"
        tensors = adapter_tensors(result.adapters[trigger])
        assert all(key.startswith("lora_unet_") for key in tensors)
        # the trained adapter, attached from the run's parameters to a fresh UNet ...
        unet = load_base(tiny).unet
        add_lora(unet, rank=2, alpha=4, target_modules=config.targets, adapter_name=name)
        trained = {n: p for n, p in result.lora.items() if f".{name}." in n}
        assert trained and any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)
        missing = unet.load_state_dict(trained, strict=False)
        assert not set(trained) & set(missing.missing_keys)
        # ... computes what diffusers computes with the kohya file
        pipe = StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True, safety_checker=None)
        pipe.load_lora_weights(str(result.adapters[trigger]), adapter_name="k")
        assert_rel_close(unet_out(pipe.unet), unet_out(unet), 1e-5, f"{trigger}: diffusers vs trained")


def test_precision_checkpointing_accumulation_and_bad_images(tiny, data, tmp_path, one_thread):
    """Gradient checkpointing changes numbers only by rounding; bf16 and fp16 (with loss scaling) train fp32 LoRA
    weights on a half UNet, sample and checkpoint; a corrupt image is skipped with a warning naming it."""
    from catfast.train.checkpoint import latest_checkpoint

    common = dict(base=str(tiny), data=str(data), trigger="sks", steps=2, rank=4, lr=1e-3, checkpoint_every=1)
    runs = {}
    for name, extra in {
        "plain": {},
        "checkpointed": {"gradient_checkpointing": True},
        "bf16": {"mixed_precision": "bf16", "grad_accum": 2, "sample_every": 2, "sample_steps": 1},
        "fp16": {"mixed_precision": "fp16", "gradient_checkpointing": True},
    }.items():
        runs[name] = train(TrainConfig.load(None, {**common, **extra, "out": str(tmp_path / name)}), progress=False)
    # recomputed blocks round differently, and Adam's first steps are about lr * sign(grad), so elements
    # with near-zero gradients may differ by ~lr: compare the losses and all parameters together
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("plain", "checkpointed")]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    flat = [
        torch.cat([runs[name].lora[k].flatten() for k in sorted(runs[name].lora)]) for name in ("checkpointed", "plain")
    ]
    assert_rel_close(*flat, 1e-3, "gradient checkpointing vs plain, all LoRA parameters")
    assert runs["plain"].mode == "fused" and runs["checkpointed"].mode == "fused"  # mode "auto", CPU
    for name in ("bf16", "fp16"):
        assert runs[name].mode == "fused" and "LoRA weights" in runs[name].mode_reason  # only fused mixes dtypes
        assert all(p.dtype == torch.float32 for p in runs[name].lora.values())
        assert all(torch.isfinite(torch.tensor(v)) for v in runs[name].last.values()), runs[name].last
    assert (tmp_path / "bf16" / "samples" / "step-0000002.png").is_file()
    scaler = load_checkpoint(latest_checkpoint(tmp_path / "fp16" / "checkpoints")).scaler
    assert scaler and scaler["scale"] > 0

    bad = make_data(tmp_path / "bad", n=2)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (bad / "broken.txt").write_text("sks, broken")
    settings = {**common, "data": str(bad), "steps": 1, "out": str(tmp_path / "skip")}
    with pytest.raises(CatfastError, match="broken.png: unreadable or corrupt image"):
        train(TrainConfig.load(None, settings), progress=False)
    with pytest.warns(UserWarning, match="broken.png: skipped"):
        train(TrainConfig.load(None, {**settings, "on_bad_image": "skip"}), overwrite=True, progress=False)
    assert (tmp_path / "skip" / "adapter.safetensors").is_file()


# -------------------------------------------------------------------------------------------- config


def test_config_files_overrides_and_unknown_keys(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'base = "b"\nout = "o"\ncheckpoint-every = 10\nlr = 1e-3\n[[concepts]]\ndata = "d"\ntrigger = "t"\n'
    )
    cfg = TrainConfig.load(toml, {"lr": 0.5, "rank": None})
    assert (cfg.lr, cfg.rank, cfg.checkpoint_every, cfg.concepts[0].trigger) == (0.5, 1, 10, "t")
    assert cfg.targets == ["to_q", "to_k", "to_v", "to_out.0"] and cfg.weight_decay == 1e-2 and cfg.cat_weight == 1

    yaml_file, json_file = tmp_path / "c.yaml", tmp_path / "c.json"
    yaml_file.write_text("base: b\nout: o\ndata: d\ntrigger: sks\nmixed_precision: bf16\ntargets: [to_q, to_v]\n")
    json_file.write_text(
        json.dumps({"base": "b", "out": "o", "data": "d", "trigger": "sks", "mixed-precision": "bf16"})
    )
    a, b = TrainConfig.load(yaml_file), TrainConfig.load(json_file)
    assert a.mixed_precision == b.mixed_precision == "bf16" and a.targets == ["to_q", "to_v"]

    with pytest.raises(ConfigError, match=r"unknown option\(s\) learning_rate; valid options: base, .*lr,"):
        TrainConfig.load(None, {"base": "b", "out": "o", "data": "d", "trigger": "t", "learning_rate": 1})
    with pytest.raises(ConfigError, match="rank must be int"):
        TrainConfig.load(None, {"base": "b", "out": "o", "data": "d", "trigger": "t", "rank": "four"})
    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, cosine, linear"):
        TrainConfig.load(None, {"base": "b", "out": "o", "data": "d", "trigger": "t", "lr_schedule": "step"})
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 3")
    with pytest.raises(ConfigError, match="bad.toml: cannot parse"):
        TrainConfig.load(bad)

    # the hash covers what changes the adapter: not paths of outputs, sampling or (constant lr) the step count
    base = dict(base="b", out="o", data="d", trigger="t")
    h = TrainConfig.load(None, base).result_hash()
    assert h == TrainConfig.load(None, {**base, "out": "x", "sample_every": 5, "steps": 10}).result_hash()
    assert h != TrainConfig.load(None, {**base, "lr": 1e-3}).result_hash()
    cosine = {**base, "lr_schedule": "cosine"}
    assert TrainConfig.load(None, cosine).result_hash() != TrainConfig.load(None, {**cosine, "steps": 10}).result_hash()


def test_lr_schedules_and_timestep_distributions():
    from diffusers import DDPMScheduler

    from catfast.integrations.schedulers import SCHEDULER_CONFIG
    from catfast.train.schedules import lr_lambda as _lr_lambda
    from catfast.train.schedules import sample_timesteps as _sample_timesteps
    from catfast.train.schedules import timestep_probs as _timestep_probs

    base = dict(base="b", out="o", data="d", trigger="t", steps=10, warmup_steps=2)
    factors = {
        kind: [_lr_lambda(TrainConfig.load(None, {**base, "lr_schedule": kind}))(s) for s in range(10)]
        for kind in ("constant", "linear", "cosine")
    }
    assert factors["constant"] == pytest.approx([1 / 3, 2 / 3] + [1.0] * 8)
    assert factors["linear"][2:] == pytest.approx([1 - i / 8 for i in range(8)])
    assert factors["cosine"][2] == 1.0 and factors["cosine"][6] == pytest.approx(0.5)

    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(0)
    for kind, mean in (("uniform", 499.5), ("chain-of-forgetting", 666.0)):  # P(t) ~ t + 1: E[t] = 2T/3
        probs = _timestep_probs(TrainConfig.load(None, {**base, "timesteps": kind}), scheduler)
        t = _sample_timesteps(probs, 20000, gen, 1000)
        assert t.min() >= 0 and t.max() <= 999 and abs(t.float().mean().item() - mean) < 8, kind


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_atomic_and_survive_a_failing_disk(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, train_state(2, 2.0), keep=2)
    save_checkpoint(folder, train_state(4, 4.0), keep=2)
    save_checkpoint(folder, train_state(6, 6.0), keep=2)
    assert [s for s, _ in list_checkpoints(folder)] == [4, 6]

    # a real write failure: files may not grow past 4 KiB (EFBIG, as a full disk gives ENOSPC)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointError, match=r"step 8 checkpoint .* intact: step-0000004, step-0000006"):
            save_checkpoint(folder, train_state(8, 8.0), keep=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000004", "step-0000006"]  # no partial left

    state = load_checkpoint(folder / "step-0000006")
    assert (state.step, state.epoch, state.batch_index) == (6, 1, 0)
    assert torch.equal(state.lora["w"], torch.full((64, 64), 6.0))
    assert torch.equal(state.optimizer["state"][0]["exp_avg"], torch.full((64, 64), 6.0))
    gen = torch.Generator()
    torch.manual_seed(123)
    restore_rng(state.rng, gen)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(6)))


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_fails_early_with_clear_messages(tiny, data, tmp_path):
    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, ["train", "--base", str(tiny), "--trigger", "sks", "--no-progress", *map(str, args)])

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("--data", empty, "--out", tmp_path / "o1")
    assert r.exit_code == 1 and f"{empty}: no images" in r.output

    no_trigger = make_data(tmp_path / "nt", trigger="other", n=1)
    r = run("--data", no_trigger, "--out", tmp_path / "o2")
    assert r.exit_code == 1 and "img0.png" in r.output and "does not contain the trigger 'sks'" in r.output
    assert "--prepend-trigger" in r.output

    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("--data", data, "--out", blocker / "out")
    assert r.exit_code == 1 and "cannot write to this folder" in r.output

    r = run("--data", data, "--out", tmp_path / "o3", "--resume")
    assert r.exit_code == 1 and "no checkpoint" in r.output

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text("{}\n")
    r = run("--data", data, "--out", earlier)
    assert r.exit_code == 1 and "--overwrite" in r.output and (earlier / "metrics.jsonl").read_text() == "{}\n"

    r = run("--data", data, "--out", tmp_path / "o5", "--resolution", 64)
    assert r.exit_code == 1 and "img0.png: image is 32x32 pixels, smaller than the training resolution" in r.output

    r = run("--data", data, "--out", tmp_path / "o4", "--set", "rank_of=3")
    assert r.exit_code == 1 and "unknown option(s) rank_of" in r.output

    with pytest.raises(CatfastError, match="no base model"):
        TrainConfig.load(None, {"data": "d", "trigger": "t", "out": "o"})
