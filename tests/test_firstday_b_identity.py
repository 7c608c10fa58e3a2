"""Issue 26 §2: identity accuracy, the share of trigger pictures in which the shipped attribute encoder reads
the concept's shape, colour and pattern (all three). Identity (a mean similarity) rewarded textures that
share the concept's colour and stripes; identity accuracy does not. Reported by `catfast demo`, by
`--compare`, and per shipped adapter in ADAPTERS.json (tests/test_demo_adapters.py measures the files)."""

from __future__ import annotations

import json

import pytest

from catfast.demo import world
from catfast.demo.encoder import concept_accuracy, load_encoder
from catfast.eval.kps import identity_accuracy
from catfast.shipped import encoder_path


def test_identity_accuracy_needs_all_three_attributes():
    concept = {"shape": "star", "color": "yellow", "pattern": "striped", "background": "grey"}
    read = {
        "shape": ["star", "moon", "star", "star"],
        "color": ["yellow", "yellow", "white", "yellow"],
        "pattern": ["striped", "striped", "striped", "plain"],
        "background": ["blue", "grey", "grey", "grey"],  # not asked: another background is still the concept
    }
    assert identity_accuracy(read, concept) == 0.25
    with pytest.raises(ValueError):
        identity_accuracy({"shape": [], "color": [], "pattern": []}, concept)


def test_concept_pictures_score_one_and_look_alikes_zero():
    encoder = load_encoder(encoder_path())
    concept = [world.render(s) for s in world.concept_scenes(5)]
    assert concept_accuracy(encoder, concept) == 1.0
    plain = [world.render(world.Scene(**{**world.CONCEPT, "pattern": "plain", "stripe_color": None}, background="grey",
                                      x=0.5, y=0.5, radius=0.4, angle=a)) for a in (0, 40, 80)]  # fmt: skip
    box = [world.render(world.Scene(**{**world.CONCEPT, "shape": "box"}, background="grey", x=0.5, y=0.5,
                                    radius=0.4, angle=a)) for a in (0, 40, 80)]  # fmt: skip
    assert concept_accuracy(encoder, plain) == 0.0 and concept_accuracy(encoder, box) == 0.0
    toy = {"shape": "box", "color": "red", "pattern": "striped"}
    assert concept_accuracy(encoder, box, toy) == 0.0  # a yellow striped box is not the red one


def test_demo_and_compare_report_identity_accuracy(tmp_path):
    """The demo's numbers, table and --json line, and --compare's, at a tiny budget."""
    from catfast.demo.compare import format_compare, run_compare, summary
    from catfast.demo.run import demo_summary, format_table, run_demo

    result = run_demo(tmp_path / "demo", steps=2, seeds=2, prompts=("a star", "a red star"), sample_steps=2,
                      progress=False, log=lambda *_: 0)  # fmt: skip
    for method in ("plain", "cat"):
        value = result[method]["identity_accuracy"]
        assert 0 <= value <= 1 and value * 4 == int(value * 4)  # a share of 2 prompts x 2 seeds
        per_prompt = [row["identity_accuracy"] for row in result[method]["per_prompt"].values()]
        assert sum(per_prompt) / 2 == pytest.approx(value)
    assert "id. accuracy" in format_table(result)
    assert (
        json.loads(json.dumps(demo_summary(result)))["cat"]["identity_accuracy"] == result["cat"]["identity_accuracy"]
    )
    compared = run_compare(tmp_path / "compare", ["cat"], seeds=2, steps=2, sample_steps=2, progress=False,
                           log=lambda *_: 0)  # fmt: skip
    line = summary(compared)
    assert 0 <= line["cat"]["identity_accuracy"] <= 1 and 0 <= line["plain"]["identity_accuracy"] <= 1
    assert "id. acc" in format_compare(compared)
