"""The shipped demo adapters (catfast/demo/assets/adapters/): small fp16 diffusers-format files at the rank of
their recipe, recorded in ADAPTERS.json with their scores, that load into the serving engine and put their
striped object into the picture when the prompt carries their trigger (judged by the demo's attribute
encoder against the base model); the striped star is read as itself (identity accuracy)."""

import json

import pytest
import safetensors
import torch

from catfast.adapters.formats import read_adapter
from catfast.demo.adapters import CONCEPTS, RECIPES, RECORD, adapters_dir, class_prompts
from catfast.demo.encoder import HEADS, concept_accuracy, load_encoder
from catfast.serve.engine import Engine
from catfast.shipped import encoder_path

pytestmark = pytest.mark.timeout(300)
SEEDS = 4
# the striped star's scores before it was retrained at rank 16 (rank 4, the same scoring): identity accuracy
# 0.125, preservation 0.8351
RANK4_STAR_PRESERVATION = 0.8351


def test_files_are_small_fp16_diffusers_and_recorded_with_scores():
    record = json.loads((adapters_dir() / RECORD).read_text())
    assert sorted(record["adapters"]) == sorted(CONCEPTS)
    for name, (trigger, fields) in CONCEPTS.items():
        path = adapters_dir() / f"{name}.safetensors"
        assert path.stat().st_size < 400_000
        with safetensors.safe_open(str(path), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        adapter = read_adapter(path)
        assert adapter.source_format in ("diffusers", "peft")
        assert {layer.rank for layer in adapter.layers.values()} == {RECIPES[name]["rank"]}
        assert adapter.components() == ["unet"]
        assert all(layer.up.abs().max() > 0 for layer in adapter.layers.values())  # trained, not zero-init B
        entry = record["adapters"][name]
        assert entry["trigger"] == trigger and entry["object"] == fields and entry["seed"] == 0
        assert entry["train"]["rank"] == RECIPES[name]["rank"]
        scores = entry["scores"]
        assert set(scores["identity_accuracy_per_prompt"]) == set(class_prompts(fields["shape"]))
        for key in ("identity_accuracy", "identity", "preservation", "kps"):
            assert 0 <= scores[key] <= 1
    star = record["adapters"]["striped-star"]["scores"]
    assert star["identity_accuracy"] >= 0.8 and star["preservation"] >= RANK4_STAR_PRESERVATION


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
            if name == "striped-star":  # read as a yellow striped star, through the serving engine
                tuned += engine.generate(f"{trigger}, a star on a green background", adapters={name: 1.0}, n=SEEDS,
                                         seed=0, steps=20)  # fmt: skip
                # measured 6 of 8 (the rank-4 file it replaced: 0 of 8)
                assert concept_accuracy(encoder, tuned, fields) >= 0.5


def test_the_script_trains_on_another_base_with_a_recipe_and_records_both(tmp_path, capsys):
    from catfast.demo.adapters import main
    from catfast.shipped import model_path

    recipe = '{"steps": 2, "rank": 2, "targets": "attention"}'
    main(["--out", str(tmp_path), "--only", "toy-box", "--base", str(model_path()), "--recipe", recipe])
    entry = json.loads((tmp_path / RECORD).read_text())["adapters"]["toy-box"]
    assert {layer.rank for layer in read_adapter(tmp_path / "toy-box.safetensors").layers.values()} == {2}
    assert entry["train"]["steps"] == 2 and entry["train"]["targets"] == "attention" and entry["train"]["rank"] == 2
    assert entry["base"] == entry["scores"]["base"] == str(model_path().absolute())
    assert "--recipe" in entry["command"] and "toy-box" in entry["command"]
    for bad, said in (
        ('{"lrx": 1}', "unknown training setting(s) lrx"),
        ("[1]", "JSON object"),
        ("{", "not JSON"),
        ('{"lr": NaN}', "lr must be a finite number"),  # json.loads reads NaN: the run's own check refuses it
        ('{"rank": "x"}', "a setting of the wrong type"),
        ('{"images": 0}', "images must be a whole number >= 1"),
    ):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path), "--recipe", bad])
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--base", str(tmp_path)])
    assert "not a diffusers model folder" in capsys.readouterr().err
