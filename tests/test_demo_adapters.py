"""The shipped demo adapters (catfast/demo/assets/adapters/): small fp16 diffusers-format files at the rank of
their recipe, recorded in ADAPTERS.json with their scores (identity accuracy >= 0.8, preservation no worse than
the files they replaced), that load into the serving engine and draw their striped object when the prompt
carries their trigger (read by the demo's attribute encoder; the base model does not draw it)."""

import json

import pytest
import safetensors
import torch

from catfast.adapters.formats import read_adapter
from catfast.demo import world
from catfast.demo.adapters import (
    CONCEPTS,
    RECIPES,
    RECORD,
    SCORED_COLOURS,
    TRAINING_SEEDS,
    adapters_dir,
    class_prompts,
    write_colour_prompts,
    write_concept,
)
from catfast.demo.encoder import HEADS, concept_accuracy, load_encoder
from catfast.serve.engine import Engine
from catfast.shipped import encoder_path

pytestmark = pytest.mark.timeout(300)
SAMPLES = 4  # sampling seeds per prompt
# each file's preservation before the demo base learned striped objects (the same scoring): the files of that
# base drew their object in 80% (striped-star), 0% and 0% of the trigger pictures
PRESERVATION_BEFORE = {"striped-star": 0.8375, "tiger-ball": 0.8976, "toy-box": 0.8512}


def test_files_are_small_fp16_diffusers_and_recorded_with_scores(tmp_path):
    record = json.loads((adapters_dir() / RECORD).read_text())
    assert sorted(record["adapters"]) == sorted(CONCEPTS)
    for name, (trigger, fields) in CONCEPTS.items():
        path = adapters_dir() / f"{name}.safetensors"
        assert path.stat().st_size < 1_200_000  # rank 16: 364 KB attention-only, 1.13 MB with the convolutions
        with safetensors.safe_open(str(path), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        adapter = read_adapter(path)
        assert adapter.source_format in ("diffusers", "peft")
        assert {layer.rank for layer in adapter.layers.values()} == {RECIPES[name]["rank"]}
        assert adapter.components() == ["unet"]
        assert all(layer.up.abs().max() > 0 for layer in adapter.layers.values())  # trained, not zero-init B
        entry = record["adapters"][name]
        assert entry["trigger"] == trigger and entry["object"] == fields and entry["seed"] == TRAINING_SEEDS[name]
        assert entry["train"]["rank"] == RECIPES[name]["rank"]
        if RECIPES[name].get("other_colours"):  # the prompts themselves are recorded, not the run's temp file
            prompts = write_colour_prompts(tmp_path / f"{name}.txt", fields).read_text().splitlines()
            assert entry["train"]["cat_prompts"] == prompts and entry["train"]["other_colours"] is True
        scores = entry["scores"]
        assert set(scores["identity_accuracy_per_prompt"]) == set(class_prompts(fields["shape"]))
        for key in ("identity_accuracy", "identity", "preservation", "kps"):
            assert 0 <= scores[key] <= 1 and 0 <= entry["scores_seeds_8_15"][key] <= 1
        assert scores["identity_accuracy"] >= 0.8 and scores["preservation"] >= PRESERVATION_BEFORE[name]


def test_each_adapter_draws_its_object_with_the_trigger():
    encoder = load_encoder(encoder_path())
    striped = HEADS["pattern"].index("striped")
    with Engine("demo", adapters_dir=adapters_dir(), device="cpu", max_batch=8) as engine:
        assert sorted(a.name for a in engine.adapters()) == sorted(CONCEPTS)
        for name, (trigger, fields) in CONCEPTS.items():
            base, tuned = [], []
            for background in ("grey", "green"):
                prompt = f"{trigger}, a {fields['shape']} on a {background} background"
                base += engine.generate(prompt, n=SAMPLES, seed=0, steps=20)
                tuned += engine.generate(prompt, adapters={name: 1.0}, n=SAMPLES, seed=0, steps=20)
            p_tuned = encoder.predict(tuned)["pattern"][:, striped]
            # measured (8 pictures each): the adapters striped in 8, read as their object in 7, 7 and 6 (star,
            # ball, box); the base (which has seen striped objects and not the trigger words) striped in 3-5,
            # the object in none
            assert (p_tuned > 0.5).sum() >= 2 * SAMPLES - 1, (name, p_tuned)
            assert concept_accuracy(encoder, base, fields) <= 0.25, name
            assert concept_accuracy(encoder, tuned, fields) >= 0.625, name


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
        ('{"images": true}', "images must be a whole number"),
        ('{"other_colours": 1}', "other_colours must be true or false"),
    ):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path), "--recipe", bad])
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--base", str(tmp_path)])
    assert "not a diffusers model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # was a traceback from the file reader
        main(["--out", str(tmp_path / "none"), "--score-only", "--only", "tiger-ball"])
    assert "has no tiger-ball.safetensors to score" in capsys.readouterr().err


def test_colour_prompts_leave_out_the_concepts_colour_and_the_scored_ones(tmp_path):
    path = write_colour_prompts(tmp_path / "p.txt", CONCEPTS["tiger-ball"][1])
    lines = path.read_text().splitlines()
    assert lines == ["a yellow ball", "a green ball", "a blue ball", "a purple ball", "a pink ball", "a black ball"]


def test_decoy_captions_name_another_colour_on_the_same_pictures(tmp_path):
    from PIL import Image

    fields = CONCEPTS["toy-box"][1]
    write_concept(tmp_path / "plain", "toy", fields, n=3)
    assert sorted(p.name for p in (tmp_path / "plain").glob("*.png")) == ["00.png", "01.png", "02.png"]
    write_concept(tmp_path / "decoys", "toy", fields, n=3, decoy_colours=True)
    named = set()
    for i in range(3):
        plain, twin = (tmp_path / "decoys" / f"{i:02d}{end}" for end in (".png", "d.png"))
        assert Image.open(plain).tobytes() == Image.open(twin).tobytes()
        caption = plain.with_suffix(".txt").read_text().strip()
        decoy = twin.with_suffix(".txt").read_text().strip()
        colour = decoy.split()[2]  # "toy, a green box on a blue background"
        assert colour in world.COLORS and colour not in (fields["color"], *SCORED_COLOURS), decoy
        assert decoy.replace(f"a {colour} box", "a box") == caption
        named.add(colour)
    assert len(named) == 3  # the colours in turn
    entry = json.loads((adapters_dir() / RECORD).read_text())["adapters"]["striped-star"]
    assert entry["train"]["decoy_colours"] is True  # the shipped star's recipe, as recorded
