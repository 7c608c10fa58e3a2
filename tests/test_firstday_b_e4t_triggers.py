"""Issue 26 §9: an E4T adapter (`catfast personalize`) shows its trigger word. `/v1/adapters` lists it (the
playground shows the listed triggers), for new files and for files written before the trigger was
recorded; `catfast adapter info` shows the trigger and the word embedding the file carries."""

from __future__ import annotations

import json

import httpx
import pytest
import safetensors
from click.testing import CliRunner
from safetensors.torch import save_file

from catfast.cli import main
from catfast.demo import world
from catfast.serve.engine import Engine
from catfast.serve.http import Server, create_app

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def e4t_folder(tmp_path_factory):
    """A real `catfast personalize` adapter (1 tuning step), and a copy without "catfast.triggers" in its
    metadata: what personalize wrote before this fix."""
    folder = tmp_path_factory.mktemp("e4t")
    picture = folder / "star.png"
    world.render(world.concept_scenes(1)[0]).save(picture)
    args = ["personalize", "--image", str(picture), "--class", "star", "--out", str(folder), "--steps", "1"]
    result = CliRunner().invoke(main, [*args, "--token", "toy"])
    assert result.exit_code == 0, result.output
    new = folder / "e4t-star.safetensors"
    with safetensors.safe_open(str(new), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    assert json.loads(metadata["catfast.triggers"]) == ["toy"]
    old = {k: v for k, v in metadata.items() if k != "catfast.triggers"}
    save_file(tensors, str(folder / "older.safetensors"), metadata=old)
    picture.unlink()
    return folder


def test_v1_adapters_lists_the_e4t_word_as_trigger(e4t_folder):
    with Engine("demo", adapters_dir=e4t_folder, device="cpu") as engine:
        with Server(create_app(engine, adapters_dir=e4t_folder)) as server:
            listed = httpx.get(f"{server.url}/v1/adapters", timeout=30).json()["data"]
    triggers = {entry["id"]: entry["triggers"] for entry in listed}
    assert triggers == {"e4t-star": ["toy"], "older": ["toy"]}


def test_adapter_info_shows_trigger_and_embedding(e4t_folder):
    text = CliRunner().invoke(main, ["adapter", "info", str(e4t_folder / "older.safetensors")])
    assert text.exit_code == 0, text.output
    assert "triggers:    toy" in text.output
    assert "embedding:   E4T word 'toy': a 64-d vector" in text.output and "class word 'star'" in text.output
    shown = CliRunner().invoke(main, ["adapter", "info", "--json", str(e4t_folder / "e4t-star.safetensors")])
    info = json.loads(shown.output)
    assert info["triggers"] == ["toy"] and info["embedding"]["word"] == "toy" and info["embedding"]["norm"] > 0


def test_adapter_info_of_a_trained_adapter_shows_its_triggers_and_no_embedding(tmp_path):
    from catfast.demo.adapters import adapters_dir

    text = CliRunner().invoke(main, ["adapter", "info", str(adapters_dir() / "toy-box.safetensors")])
    assert text.exit_code == 0, text.output
    assert "triggers:    toy" in text.output and "embedding:" not in text.output
