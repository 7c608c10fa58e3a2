"""mode "measure" (what "auto" does on a GPU): the run times the fused and the reference step over its first steps,
interleaved, and keeps the faster; every step trains (the two modes are exact), and metrics.jsonl says which
mode each step ran and why the run kept one."""

import json

import pytest

from catfast.train.config import TrainConfig
from catfast.train.mode_trial import TRIAL_MODES, ModeTrial
from catfast.train.trainer import train


def test_trial_alternates_skips_warmup_and_keeps_the_faster():
    trial = ModeTrial(warmup=1, rounds=2)
    times = {"fused": [9.0, 1.0, 1.2], "reference": [9.0, 2.0, 2.2]}  # warm-up steps slow, then fused faster
    modes = []
    while trial.decided is None:
        mode = trial.next_mode()
        modes.append(mode)
        trial.record(mode, times[mode][sum(m == mode for m in modes) - 1])
    assert modes == ["fused", "reference"] * 3
    mode, why = trial.decided
    assert mode == "fused" and "fused 1100.0 ms against reference 2100.0 ms" in why
    assert trial.next_mode() == "fused" and trial.record("fused", 5.0) is None


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_measure_mode_trains_and_keeps_the_faster(tiny, data, tmp_path, one_thread, precision):
    """bf16: the trainer's common GPU layout (a bf16 UNet, fp32 LoRA weights), which both modes run."""
    out = tmp_path / "run"
    config = TrainConfig.load(None, dict(base=str(tiny), data=str(data), trigger="sks", steps=10, rank=4, lr=1e-3,
                                         checkpoint_every=0, mode="measure", mixed_precision=precision,
                                         out=str(out)))  # fmt: skip
    result = train(config, progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in lines[:8]] == list(TRIAL_MODES) * 4  # 1 warm-up + 3 timed steps each
    decided = [r for r in lines if "measured over the run's first steps" in r.get("mode_reason", "")]
    assert len(decided) == 1 and decided[0]["step"] == 9
    assert all(r["mode"] == decided[0]["mode"] for r in lines[8:])
    assert result.mode == decided[0]["mode"] and all(r["loss"] == r["loss"] for r in lines)  # finite, not NaN
    assert (out / "sks.safetensors").is_file() or any(out.glob("*.safetensors"))
