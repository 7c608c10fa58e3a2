"""Issue 26, item 3: an adapter trained on `--base demo` can be scored without a CLIP model: the demo's own
attribute encoder is the default there (and any other base says which flag it needs). Failed before: --clip
was required on every base."""

import json

import pytest
from click.testing import CliRunner

from catfast.cli import main
from catfast.demo.adapters import adapters_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_kps_on_the_demo_base_scores_with_the_demo_encoder(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star on a green background\n")
    out_json = tmp_path / "kps.json"
    args = ["eval", "kps", "--base", "demo", "--adapter", adapters_dir() / "striped-star.safetensors", "--prompts",
            prompts, "--trigger", "sks", "--seeds", 2, "--steps", 2, "--out-json", out_json, "--json"]  # fmt: skip
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    total = json.loads(next(line for line in r.output.splitlines() if line.startswith("{")))
    assert 0 < total["preservation"] <= 1 and 0 < total["identity"] <= 1 and 0 < total["kps"] <= 1
    settings = json.loads(out_json.read_text())["settings"]
    assert settings["clip"] is None and settings["encoder"] == "DomainEncoder"


def test_eval_kps_on_another_base_names_the_flag_it_needs(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n")
    adapter = adapters_dir() / "striped-star.safetensors"
    args = ["eval", "kps", "--base", tmp_path, "--adapter", adapter, "--prompts", prompts, "--trigger", "sks"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2
    assert "--clip DIR" in r.output and "--base demo" in r.output
