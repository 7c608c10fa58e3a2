"""The shipped demo adapters (catfast/demo/assets/adapters/): small fp16 diffusers-format rank-4 files,
recorded in ADAPTERS.json, that load into the serving engine and put their striped object into the picture
when the prompt carries their trigger (judged by the demo's attribute encoder against the base model)."""

import json

import pytest
import safetensors
import torch

from catfast.adapters.formats import read_adapter
from catfast.demo.adapters import CONCEPTS, RECORD, adapters_dir
from catfast.demo.encoder import HEADS, load_encoder
from catfast.demo.shipped import encoder_path
from catfast.serve.engine import Engine

pytestmark = pytest.mark.timeout(300)
SEEDS = 4


def test_files_are_small_fp16_rank4_diffusers_and_recorded():
    record = json.loads((adapters_dir() / RECORD).read_text())
    assert sorted(record["adapters"]) == sorted(CONCEPTS)
    for name, (trigger, fields) in CONCEPTS.items():
        path = adapters_dir() / f"{name}.safetensors"
        assert path.stat().st_size < 200_000
        with safetensors.safe_open(str(path), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        adapter = read_adapter(path)
        assert adapter.source_format in ("diffusers", "peft")
        assert {layer.rank for layer in adapter.layers.values()} == {4}
        assert adapter.components() == ["unet"]
        assert all(layer.up.abs().max() > 0 for layer in adapter.layers.values())  # trained, not zero-init B
        entry = record["adapters"][name]
        assert entry["trigger"] == trigger and entry["object"] == fields and entry["seed"] == 0


def test_each_adapter_draws_its_striped_object_with_the_trigger():
    encoder = load_encoder(encoder_path())
    striped = HEADS["pattern"].index("striped")
    with Engine("demo", adapters_dir=adapters_dir(), device="cpu", max_batch=8) as engine:
        assert sorted(a.name for a in engine.adapters()) == sorted(CONCEPTS)
        for name, (trigger, fields) in CONCEPTS.items():
            prompt = f"{trigger}, a {fields['shape']} on a grey background"
            base = engine.generate(prompt, n=SEEDS, seed=0, steps=20)
            tuned = engine.generate(prompt, adapters={name: 1.0}, n=SEEDS, seed=0, steps=20)
            p_base = encoder.predict(base)["pattern"][:, striped]
            p_tuned = encoder.predict(tuned)["pattern"][:, striped]
            # measured: base 0.00-0.01, adapter 1.00 on every seed (all three adapters)
            assert (p_base < 0.5).all(), (name, p_base)
            assert (p_tuned > 0.5).sum() >= SEEDS - 1, (name, p_tuned)
