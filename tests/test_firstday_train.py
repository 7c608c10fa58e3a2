"""Issue 26, a real user's first day with `catfast train`: every checkpoint is kept and is a loadable adapter
(items 5), the defaults follow the base and the run says what it trains with (6), and kohya's
``N_trigger class`` folders train as kohya users expect (7). Each test failed before its fix."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from catfast.adapters.formats import read_adapter
from catfast.cli import main
from catfast.testing import make_data, train_state
from catfast.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from catfast.train.config import ConceptConfig, ConfigError, TrainConfig
from catfast.train.data import Concept, scan_concepts
from catfast.train.recipes import DEMO_RECIPE, PAPER_RECIPE

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def _train(*args):
    r = _cli("train", "--no-progress", "--threads", "1", *args)
    assert r.exit_code == 0, r.output
    return r


# ---------------------------------------------------------------------------------------- 5. checkpoints


def test_every_checkpoint_is_kept_and_is_the_same_kind_of_adapter_as_the_final_one(tiny, data, tmp_path):
    out = tmp_path / "run"
    _train("--base", tiny, "--data", data, "--trigger", "sks", "--out", out, "--steps", 4, "--checkpoint-every", 2)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]  # kohya's save_every_n_steps habit
    final = out / "adapter.safetensors"
    for step in (2, 4):
        lora = out / "checkpoints" / f"step-{step:07d}" / "lora.safetensors"
        info = _cli("adapter", "info", lora)
        assert info.exit_code == 0, info.output
        assert "diffusers" in info.output and "rank:        1" in info.output
        adapter = read_adapter(lora)
        assert adapter.metadata["catfast.steps"] == str(step)
        assert json.loads(adapter.metadata["catfast.triggers"]) == ["sks"]
    # the last checkpoint's adapter is the final adapter, key for key and bit for bit
    last, done = load_file(out / "checkpoints" / "step-0000004" / "lora.safetensors"), load_file(final)
    assert last.keys() == done.keys() and all(torch.equal(last[k], done[k]) for k in done)
    first = load_file(out / "checkpoints" / "step-0000002" / "lora.safetensors")
    assert any(not torch.equal(first[k], done[k]) for k in done)  # an earlier step, not a copy

    # --resume still reads its parameters, and --keep-checkpoints is a flag that keeps the newest N
    _train("--base", tiny, "--data", data, "--trigger", "sks", "--out", out, "--steps", 8, "--checkpoint-every", 2,
           "--keep-checkpoints", 2, "--resume")  # fmt: skip
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [6, 8]
    help_text = _cli("train", "-h").output
    assert "--keep-checkpoints" in help_text and "0: all" in help_text


def test_kohya_format_checkpoints_are_kohya_adapters(tiny, data, tmp_path):
    out = tmp_path / "run"
    _train("--base", tiny, "--data", data, "--trigger", "sks", "--out", out, "--steps", 2, "--checkpoint-every", 1,
           "--format", "kohya")  # fmt: skip
    for step in (1, 2):
        adapter = read_adapter(out / "checkpoints" / f"step-{step:07d}" / "lora.safetensors")
        assert adapter.source_format.startswith("kohya")
    assert read_adapter(out / "adapter.safetensors").source_format == adapter.source_format


def test_a_checkpoint_written_before_params_safetensors_still_resumes(tmp_path):
    folder = tmp_path / "checkpoints"
    path = save_checkpoint(folder, train_state(3, 3.0))
    (path / "params.safetensors").rename(path / "lora.safetensors")  # the earlier layout
    assert torch.equal(load_checkpoint(path).lora["w"], torch.full((64, 64), 3.0))


# ---------------------------------------------------------------------------------------------- 6. defaults


def test_defaults_follow_the_base():
    demo = TrainConfig.load(None, dict(base="demo", data="d", trigger="t", out="o"))
    assert {k: getattr(demo, k) for k in DEMO_RECIPE} == DEMO_RECIPE
    assert DEMO_RECIPE == dict(rank=16, lr=1e-3, batch_size=4, steps=300, random_flip=False)
    other = TrainConfig.load(None, dict(base="models/sd15", data="d", trigger="t", out="o"))
    assert {k: getattr(other, k) for k in PAPER_RECIPE} == PAPER_RECIPE
    given = TrainConfig.load(None, dict(base="demo", data="d", trigger="t", out="o", rank=4, lr=5e-4))
    assert (given.rank, given.lr, given.batch_size, given.steps) == (4, 5e-4, 4, 300)
    assert "rank 4 (alpha 4), lr 0.0005" in given.describe() and "batch_size 4, steps 300" in given.describe()
    assert "random_flip off" in given.describe() and other.random_flip is True  # the paper's: on
    flipped = TrainConfig.load(None, dict(base="demo", data="d", trigger="t", out="o", random_flip=True))
    assert flipped.random_flip is True and "random_flip" not in flipped.describe().split("defaults from")[1]


def test_the_demo_trains_with_the_recipe_that_base_demo_defaults_to():
    from catfast.demo.run import TRAIN, UNET_EXTRA

    assert {k: {**TRAIN, **UNET_EXTRA}[k] for k in DEMO_RECIPE} == DEMO_RECIPE


def test_train_says_what_it_trains_with_before_it_starts(data, tmp_path):
    r = _train("--base", "demo", "--data", data, "--trigger", "sks", "--out", tmp_path / "run", "--steps", 1,
               "--checkpoint-every", 0)  # fmt: skip
    lines = r.output.splitlines()
    first = next(line for line in lines if line.startswith("training with"))
    assert lines.index(first) < next(i for i, line in enumerate(lines) if line.startswith("trained 1 steps"))
    assert first.startswith("training with rank 16 (alpha 16), lr 0.001 (constant), batch 4, 1 steps")
    assert "defaults from the demo's recipe (--base demo): rank 16, lr 0.001, batch_size 4" in first
    help_text = _cli("train", "-h").output
    assert "16 on --base demo" in help_text


# ----------------------------------------------------------------------------------------- 7. kohya folders


def _kohya(parent: Path, name: str, trigger: str, captions: bool, seed: int = 0) -> Path:
    folder = make_data(parent / name, trigger=trigger, seed=seed, n=3)
    if not captions:
        for txt in folder.glob("*.txt"):
            txt.unlink()
    return folder


def test_kohya_folder_repeats_and_folder_name_captions(tmp_path):
    parent = tmp_path / "train"
    _kohya(parent, "10_sks star", "sks", captions=False)
    (parent / "10_sks star" / "img0.txt").write_text("sks, a star on grass")  # a .txt wins over the name
    examples = scan_concepts([Concept(parent, "sks")])
    assert len(examples) == 30  # 3 images x 10 repeats
    captions = {e.image.name: e.caption for e in examples}
    assert captions == {"img0.png": "sks, a star on grass", "img1.png": "sks star", "img2.png": "sks star"}
    assert {e.caption_stripped for e in examples} == {"a star on grass", "star"}
    # --trigger is read from the folder name; given, it must match
    config = TrainConfig.load(None, dict(base="b", data=str(parent), out="o"))
    assert config.concepts == [ConceptConfig(str(parent), "sks")]
    with pytest.raises(Exception, match=r"10_sks star do not name the trigger 'ohwx'"):
        TrainConfig.load(None, dict(base="b", data=str(parent), trigger="ohwx", out="o"))


def test_several_kohya_folders_train_several_concepts(tiny, tmp_path):
    parent = tmp_path / "train"
    _kohya(parent, "10_sks star", "sks", captions=False)
    _kohya(parent, "5_ohwx ball", "ohwx", captions=False, seed=5)
    (parent / "notes").mkdir()  # not N_trigger class: left out with a warning, as kohya does
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = _train("--base", tiny, "--data", parent, "--out", out, "--steps", 2, "--checkpoint-every", 0)
    assert any("notes" in str(w.message) for w in caught)
    assert "2 concept(s)" in r.output
    config = json.loads((out / "config.json").read_text())
    assert [c["trigger"] for c in config["concepts"]] == ["sks", "ohwx"]
    for trigger, caption in (("sks", "sks star"), ("ohwx", "ohwx ball")):
        adapter = read_adapter(out / f"adapter-{trigger}.safetensors")
        assert json.loads(adapter.metadata["catfast.triggers"]) == [trigger]
        assert json.loads(adapter.metadata["catfast.trigger_prompts"]) == [caption]


def test_a_data_folder_of_other_subfolders_says_how_to_name_them(tiny, tmp_path):
    parent = tmp_path / "train"
    _kohya(parent, "sks star", "sks", captions=True)  # no repeat count
    r = _cli("train", "--base", tiny, "--data", parent, "--trigger", "sks", "--out", tmp_path / "run")
    assert r.exit_code != 0
    assert "no images" in r.output and "N_trigger class (e.g. 10_sks dog" in r.output
    r = _cli("train", "--base", tiny, "--data", parent, "--out", tmp_path / "run")
    assert r.exit_code != 0 and "--trigger" in r.output
    assert "N_trigger class" in _cli("train", "-h").output


def test_config_from_its_own_config_json_still_validates(tmp_path):
    parent = tmp_path / "train"
    _kohya(parent, "10_sks star", "sks", captions=False)
    _kohya(parent, "5_ohwx ball", "ohwx", captions=False)
    config = TrainConfig.load(None, dict(base="b", data=str(parent), out="o"))
    again = TrainConfig.from_dict(config.to_dict())
    again.validate()
    assert again.concepts == config.concepts
    with pytest.raises(ConfigError, match="either data/trigger or a concepts list"):
        TrainConfig.load(None, dict(base="b", trigger="sks", out="o", concepts=[{"data": "x", "trigger": "sks"}]))
