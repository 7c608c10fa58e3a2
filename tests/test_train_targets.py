"""`catfast train --targets` (LoRA target modules, with the presets attention and locon) and
`--random-flip/--no-random-flip`: the flags reach the run, a LoCon run trains the UNet's convolutions, a run
without flips caches no mirror images, and a DiT base refuses the UNet-only preset in one line."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from catfast.adapters.formats import read_adapter
from catfast.cli import main
from catfast.integrations.factory_dit import init_dit_folder
from catfast.targets import ATTENTION_PROJECTIONS, PRESETS, UNET_CONVOLUTIONS, expand_targets
from catfast.train.config import ConfigError, TrainConfig
from catfast.train.transform import Transform, plan_image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_presets_and_comma_lists_expand_in_order_without_duplicates():
    assert expand_targets("locon") == list(ATTENTION_PROJECTIONS + UNET_CONVOLUTIONS)
    assert expand_targets("attention") == list(ATTENTION_PROJECTIONS)
    assert expand_targets(" to_q , conv1,to_q") == ["to_q", "conv1"]
    assert expand_targets(["to_k,to_v", "locon"])[:3] == ["to_k", "to_v", "to_q"]
    assert set(PRESETS) == {"attention", "locon"}


def test_flags_set_the_config_and_the_run_says_so(tiny, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--no-progress", "--threads", "1", "--base", tiny, "--data", data, "--trigger", "sks",
            "--out", out, "--steps", 2, "--rank", 2, "--checkpoint-every", 0, "--targets", "locon",
            "--no-random-flip"]  # fmt: skip
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    first = next(line for line in r.output.splitlines() if line.startswith("training with"))
    assert "targets to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,proj_in,proj_out, random flip off" in first
    saved = json.loads((out / "config.json").read_text())
    assert saved["targets"] == expand_targets("locon") and saved["random_flip"] is False
    adapter = read_adapter(out / "adapter.safetensors")
    from catfast.integrations.models import load_base

    unet = load_base(tiny).unet
    matched = {n for n, _ in unet.named_modules() if n.endswith(tuple("." + t for t in expand_targets("locon")))}
    assert {name.removeprefix("unet.") for name in adapter.layers} == matched  # every module of the preset, no other
    assert any(n.endswith(".conv1") for n in matched) and any(n.endswith(".proj_in") for n in matched)
    assert all(layer.up.abs().max() > 0 for layer in adapter.layers.values())  # trained, not B's zero init
    convs = [layer for name, layer in adapter.layers.items() if name.endswith(("conv1", "conv2"))]
    assert convs and all(layer.down.ndim == 4 for layer in convs)  # a conv LoRA: [r, C, k, k] down factor

    help_text = CliRunner().invoke(main, ["train", "-h"]).output
    assert "--targets" in help_text and "locon" in help_text and "--no-random-flip" in help_text


def test_without_flips_no_mirror_image_is_cached():
    seen = {}
    for flip in (True, False):
        transform = Transform(32, center_crop=False, random_flip=flip, crop_variants=2)
        plan = plan_image(Path("a.png"), (40, 40), transform, 8, "digest")
        seen[flip] = [v[2] for v in plan.variants]
    assert True in seen[True] and False in seen[True]
    assert seen[False] and not any(seen[False])


def test_config_files_take_a_preset_or_a_list(tmp_path):
    base = dict(base="demo", data=str(tmp_path), trigger="sks", out=str(tmp_path / "o"))
    config = TrainConfig.from_dict({**base, "targets": "locon"})
    config.validate()
    assert config.targets == expand_targets("locon")
    config = TrainConfig.from_dict({**base, "targets": ["attention", "conv1"]})
    config.validate()
    assert config.targets == [*ATTENTION_PROJECTIONS, "conv1"]
    with pytest.raises(ConfigError, match="or a preset"):
        TrainConfig.from_dict({**base, "targets": " , "}).validate()


def test_a_dit_base_refuses_the_unet_preset_in_one_line(tmp_path):
    folder = init_dit_folder("tiny-flux", tmp_path / "flux")
    config = TrainConfig(base=str(folder), data=str(tmp_path), trigger="sks", out=str(tmp_path / "o"), targets="locon")
    with pytest.raises(ConfigError) as e:
        config.validate()
    message = str(e.value)
    assert "locon" in message and "flux" in message and "linear layers" in message and "\n" not in message
    config = TrainConfig(base=str(folder), data=str(tmp_path), trigger="sks", out=str(tmp_path / "o"))
    config.validate()  # unset: the family's own targets
    assert config.targets != list(ATTENTION_PROJECTIONS) and "conv1" not in config.targets


@pytest.mark.parametrize(
    "targets, named",
    [
        ("to_zz,conv_zz", "match the LoRA target(s) to_zz,conv_zz"),
        ("attention,to_zz", "matches the LoRA target(s) to_zz"),
    ],
)
def test_targets_that_match_no_module_are_one_line_errors_before_out_changes(tiny, data, tmp_path, targets, named):
    # a typo beside a valid name (to_q,to_zz) is refused too: peft would train to_q and skip to_zz silently
    args = ["train", "--no-progress", "--threads", "1", "--base", tiny, "--data", data, "--trigger", "sks",
            "--out", tmp_path / "run", "--steps", 1, "--targets", targets]  # fmt: skip
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: no module of the UNet2DConditionModel {named} (suffixes"), last
    assert not (tmp_path / "run" / "config.json").exists()  # refused before OUT was started
