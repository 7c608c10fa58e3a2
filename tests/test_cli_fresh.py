"""Issue 18, a fresh machine's first hour: every command starts fast, fails with one line before any work
when its output place or input is bad, never writes where it should not, and the newcomer's path
(`--base demo`, `train -h`, labelled grids, one format name) holds. One test (or more) per defect class;
each failed before its fix."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from catfast.adapters import write_adapter
from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import read_adapter
from catfast.cli import DEMO_TIME, main
from catfast.errors import AdapterFormatError, CatfastError
from catfast.export.onnx import AdapterSpec, ExportError
from catfast.export.runner import RunnerError, run_onnx, save_png
from catfast.export.validate import _errors
from catfast.folders import write_atomic
from catfast.integrations.factory import init_model_folder
from catfast.integrations.models import base_location
from catfast.testing import make_data, train_state
from catfast.train.checkpoint import list_checkpoints, save_checkpoint
from catfast.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "transformers", "peft", "onnx", "onnxruntime")


def _adapter(seed: int = 0, rank: int = 2) -> LoraAdapter:
    """A small random adapter (B nonzero) on one tiny-UNet attention projection."""
    g = torch.Generator().manual_seed(seed)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = LoraLayer(down=torch.randn(rank, 32, generator=g), up=torch.randn(32, rank, generator=g), alpha=3.0)
    return LoraAdapter({key: layer})


@pytest.fixture
def adapter_file(tmp_path):
    path = tmp_path / "a.safetensors"
    write_adapter(_adapter(), path)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *needles):
    """A clean failure: exit 1, one line starting with "Error:" that contains every needle."""
    lines = [x for x in r.output.strip().splitlines() if not x.startswith("note: this machine is busy")]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def blocked(tmp_path) -> Path:
    """A folder that cannot be created (its parent is a file): unwritable even for root."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return blocker / "sub"


# ------------------------------------------------------------------------------- §2 startup and threads


def test_help_and_adapter_info_import_no_heavy_library(adapter_file):
    """`catfast --help` / `adapter info` used to import diffusers and transformers (4-7 s) for every command."""
    code = (
        "import sys\nfrom catfast.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    for args in (["--help"], ["train", "--help"], ["adapter", "info", str(adapter_file)]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "[]", (args, r.stdout[-300:])
    # `env` imports what it probes (triton, onnxruntime), but reads the others' versions without importing them
    r = subprocess.run([sys.executable, "-c", code, "env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not {"diffusers", "transformers", "peft"} & set(eval(r.stdout.strip().splitlines()[-1]))


def test_demo_time_and_threads_are_stated_one_way():
    readme = (ROOT / "README.md").read_text()
    help_text = " ".join(invoke("demo", "--help").output.split())
    assert DEMO_TIME in readme and DEMO_TIME in help_text
    assert "--threads INTEGER RANGE" in help_text and "[default: 1; x>=1]" in help_text
    assert "a few minutes" not in help_text and "110-115 s" not in readme


def test_threads_option_sets_torch_threads(tiny, data, tmp_path, one_thread):
    torch.set_num_threads(2)
    r = invoke("train", "--base", tiny, "--data", data, "--trigger", "sks", "--out", tmp_path / "o", "--steps", 1,
               "--checkpoint-every", 0, "--threads", 1, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1


def test_default_export_says_run_onnx_cannot_run_it(tiny, tmp_path):
    r = invoke("export", "onnx", "--base", tiny, "--out", tmp_path / "unet-only")
    assert r.exit_code == 0, r.output
    assert "note: no text_encoder, vae_decoder in this export, so `catfast run-onnx` cannot run it" in r.output
    assert "`catfast run-onnx` needs all three" in " ".join(invoke("export", "onnx", "--help").output.split())


# ------------------------------------------------------------------------------------ §3 non-finite values


@pytest.mark.parametrize("where", ["up", "down", "alpha"])
def test_non_finite_adapters_are_refused_on_load(tmp_path, where):
    path = tmp_path / "bad.safetensors"
    write_adapter(_adapter(), path, format="kohya")
    tensors = load_file(path)
    suffix = {"up": "lora_up.weight", "down": "lora_down.weight", "alpha": "alpha"}[where]
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan") if where != "down" else float("inf")
    save_file(tensors, path)
    with pytest.raises(AdapterFormatError, match="NaN|nan|inf"):
        read_adapter(path)
    one_line_error(invoke("adapter", "info", path), str(path))


def test_onnx_validation_fails_on_non_finite_outputs():
    want = [torch.tensor([1.0, float("nan")])]
    assert _errors([np.array([1.0, float("nan")], np.float32)], want) == (math.inf, math.inf)
    assert _errors([np.array([1.0, 2.0], np.float32)], want)[1] == math.inf
    assert _errors([np.array([1.0, 2.0], np.float32)], [torch.tensor([1.0, 2.0])]) == (0.0, 0.0)


def test_export_of_a_non_finite_adapter_fails_validation_and_writes_nothing(tiny, tmp_path):
    from catfast.export.onnx import export_onnx

    bad = _adapter()  # in memory (files are refused on load): NaN reaches the graph
    next(iter(bad.layers.values())).up[0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN or Inf"):
        export_onnx(tiny, tmp_path / "out", adapters=[AdapterSpec("bad", adapter=bad)])
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_export_refuses_non_finite_and_bad_scales(tmp_path, adapter_file):
    for text in (f"{adapter_file}:nan", f"{adapter_file}:inf"):
        with pytest.raises(ExportError, match="not a finite number"):
            AdapterSpec.parse(text)
    with pytest.raises(ExportError, match="scale 'abc' is not a number"):
        AdapterSpec.parse(f"{adapter_file}:abc")
    r = invoke("export", "onnx", "--base", tmp_path, "--out", tmp_path / "o", "--adapter", f"{adapter_file}:abc")
    one_line_error(r, "'abc' is not a number")


def test_eval_kps_refuses_a_non_finite_adapter(tiny, tmp_path):
    from catfast.eval.encoders import make_tiny_clip

    bad = _adapter()
    next(iter(bad.layers.values())).up[0, 0] = float("inf")
    path = tmp_path / "inf.safetensors"
    write_adapter(bad, path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a star\n")
    clip = make_tiny_clip(tmp_path / "clip", seed=0)
    r = invoke("eval", "kps", "--base", tiny, "--adapter", path, "--prompts", prompts, "--clip", clip,
               "--trigger", "sks", "--seeds", 2, "--steps", 1, "--json")  # fmt: skip
    one_line_error(r, str(path), "non-finite")


# ------------------------------------------------------------------------------------------ §3 --set


def test_set_applies_unless_its_own_flag_is_given(tiny, data, tmp_path, one_thread):
    out = tmp_path / "run"
    r = invoke("train", "--base", tiny, "--data", data, "--trigger", "sks", "--out", out, "--no-progress",
               "--set", "rank=3", "--set", "steps=9", "--steps", 2, "--set", "checkpoint-every=0")  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert (config["rank"], config["steps"], config["checkpoint_every"]) == (3, 2, 0)  # --set, flag, --set
    assert set(read_adapter(out / "adapter.safetensors").describe()["ranks"].values()) == {3}


# ------------------------------------------------------------------------------ §3 unwritable outputs


def test_unwritable_outputs_fail_before_any_work(tiny, adapter_file, tmp_path):
    bad = blocked(tmp_path)
    one_line_error(invoke("adapter", "convert", adapter_file, bad / "k.safetensors", "--to", "kohya"), "cannot write")
    one_line_error(invoke("cat-step", "--base", tiny, "--out", bad / "a.safetensors"), "cannot write")
    one_line_error(invoke("models", "init", "tiny", bad / "m"), "cannot write")
    one_line_error(invoke("export", "onnx", "--base", tiny, "--out", bad / "e"), "cannot write")
    one_line_error(invoke("run-onnx", "--model", tmp_path, "--prompt", "x", "--out", bad / "x.png"), "cannot write")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a star\n")
    kps = ("eval", "kps", "--base", tiny, "--adapter", adapter_file, "--prompts", prompts, "--clip", tmp_path,
           "--trigger", "sks")  # fmt: skip
    one_line_error(invoke(*kps, "--out-json", bad / "r.json"), "cannot write")
    one_line_error(invoke(*kps, "--grid", bad / "g.png"), "cannot write")
    assert not (tmp_path / "a-file").is_dir()


# ------------------------------------------------------------------- §3 overwrites, links, atomic files


def test_run_onnx_out_needs_overwrite_and_never_follows_a_link(tmp_path):
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    one_line_error(invoke("run-onnx", "--model", tmp_path, "--prompt", "x", "--out", existing), "--overwrite")
    assert existing.read_bytes() == b"keep"
    target = tmp_path / "target.png"
    target.write_bytes(b"target")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    for extra in ((), ("--overwrite",)):
        one_line_error(invoke("run-onnx", "--model", tmp_path, "--prompt", "x", "--out", link, *extra), "link")
    assert target.read_bytes() == b"target"
    # the PNG writer is atomic: a link in its place is replaced, its target untouched
    save_png(np.zeros((4, 4, 3), np.float32), link)
    assert not link.is_symlink() and Image.open(link).size == (4, 4) and target.read_bytes() == b"target"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_onto_a_linked_folder_is_refused_and_leaves_nothing(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    one_line_error(invoke("models", "init", "tiny", link, "--overwrite"), "symbolic link")
    assert (real / "mine.txt").read_text() == "mine" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-* / .partial-*


def test_demo_refuses_a_non_empty_out(tmp_path, one_thread):
    (tmp_path / "grid.png").write_bytes(b"my picture")
    one_line_error(invoke("demo", "--out", tmp_path), "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    assert (tmp_path / "grid.png").read_bytes() == b"my picture"


def test_atomic_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.bin", b"x")
        (tmp_path / "b.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644


def test_overwrite_hint_names_the_flag(adapter_file):
    with pytest.raises(CatfastError, match="pass --overwrite") as e:
        write_adapter(read_adapter(adapter_file), adapter_file)
    assert "overwrite=True" not in str(e.value)


# -------------------------------------------------------------------------------------- §3 adapter names


@pytest.mark.parametrize("name", [".", ".."])
def test_adapter_names_dot_and_dotdot_are_refused(tiny, adapter_file, tmp_path, name):
    out = tmp_path / "exp"
    spec = f"{name}={adapter_file}"
    r = invoke("export", "onnx", "--base", tiny, "--out", out, "--adapter-inputs", "--adapter", spec)
    one_line_error(r, "must not be '.' or '..'")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


# ------------------------------------------------------------------------------------------- §3 train


def test_failed_input_checks_leave_no_config_json(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    r = invoke("train", "--base", tiny, "--data", empty, "--trigger", "sks", "--out", out, "--no-progress")
    one_line_error(r, "no images")
    assert not (out / "config.json").exists()
    r = invoke("train", "--base", tmp_path / "nope", "--data", make_data(tmp_path / "d"), "--trigger", "sks",
               "--out", out, "--no-progress")  # fmt: skip
    assert r.exit_code == 1 and not (out / "config.json").exists()


def test_allow_upscale_exists_where_the_error_names_it(tiny, tmp_path, one_thread):
    data = make_data(tmp_path / "d", n=1)
    args = ("train", "--base", tiny, "--data", data, "--trigger", "sks", "--no-progress", "--steps", 1,
            "--checkpoint-every", 0, "--resolution", 64)  # fmt: skip
    one_line_error(invoke(*args, "--out", tmp_path / "o1"), "--allow-upscale")
    r = invoke(*args, "--out", tmp_path / "o2", "--allow-upscale")
    assert r.exit_code == 0, r.output


def test_resume_checks_content_not_paths(tiny, tmp_path, one_thread):
    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    data = make_data(tmp_path / "d", n=2)
    out = tmp_path / "run"
    args = ("train", "--base", base, "--data", data, "--trigger", "sks", "--out", out, "--no-progress",
            "--checkpoint-every", 1)  # fmt: skip
    assert invoke(*args, "--steps", 3).exit_code == 0

    # the same paths, other content: a new image, then other base weights (same size, another seed)
    from catfast.train.quickstart import synthetic_image

    original = (data / "img0.png").read_bytes()
    synthetic_image(32, 99).save(data / "img0.png")
    one_line_error(invoke(*args, "--steps", 4, "--resume"), "training images changed", "img0.png")
    (data / "img0.png").write_bytes(original)
    init_model_folder("tiny", base, seed=5, overwrite=True)
    one_line_error(invoke(*args, "--steps", 4, "--resume"), "base model's weights changed")
    shutil.rmtree(base)
    shutil.copytree(tiny, base)  # the same content again, with new file times: resumes
    r = invoke(*args, "--steps", 4, "--resume")
    assert r.exit_code == 0, r.output


def test_resume_does_not_redo_steps_and_the_summary_has_one_timing(tiny, data, tmp_path, one_thread):
    out = tmp_path / "run"
    args = ("train", "--base", tiny, "--data", data, "--trigger", "sks", "--out", out, "--no-progress",
            "--checkpoint-every", 5)  # fmt: skip
    r = invoke(*args, "--steps", 2)
    assert r.exit_code == 0, r.output
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]  # the last step is checkpointed
    r = invoke(*args, "--steps", 3, "--resume")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("trained"))
    assert line.startswith("trained 1 steps (resumed at step 2) in ") and line.endswith(" s per step)"), line
    assert "steps/s" not in line
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_an_interrupted_prune_leaves_only_complete_step_folders(tmp_path, monkeypatch):
    from catfast.train import checkpoint

    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, train_state(1, 1.0), keep=1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):  # delete one file, then die as a kill -9 would (no cleanup)
        files = sorted(p for p in Path(path).iterdir())
        files[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, train_state(2, 2.0), keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    for _, path in list_checkpoints(folder):
        assert all((path / name).is_file() for name in checkpoint.FILES), f"{path.name} is incomplete"
    save_checkpoint(folder, train_state(3, 3.0), keep=1)  # the next save cleans the hidden remains up
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000003"]


def test_run_onnx_refuses_bad_sizes_and_guidance(tmp_path):
    r = invoke("run-onnx", "--model", tmp_path, "--prompt", "x", "--out", tmp_path / "o.png", "--height", 0)
    assert r.exit_code == 2 and "--height" in r.output and "Traceback" not in r.output  # click's usage error
    for kwargs, needle in (({"height": 0}, "height"), ({"width": -8}, "width"), ({"guidance_scale": math.nan}, "guid")):
        with pytest.raises(RunnerError, match=needle):
            run_onnx(tmp_path, "x", tmp_path / "o.png", **kwargs)
    r = invoke("run-onnx", "--model", tmp_path, "--prompt", "x", "--out", tmp_path / "o.png", "--guidance-scale", "nan")
    one_line_error(r, "guidance scale must be a finite number")


# ------------------------------------------------------------------------------------- §4 the newcomer


def test_base_demo_names_the_shipped_model(tmp_path):
    from catfast.shipped import model_path

    assert Path(base_location("demo")) == model_path() and base_location("./demo") == "./demo"
    assert TrainConfig(base="demo").result_settings()["base"] == str(model_path().resolve())
    out = tmp_path / "a.safetensors"
    r = invoke("cat-step", "--base", "demo", "--steps", 1, "--out", out)
    assert r.exit_code == 0, r.output
    assert read_adapter(out).describe()["format"] == "diffusers"
    one_line_error(invoke("run-onnx", "--model", "demo", "--prompt", "x", "--out", tmp_path / "x.png"),
                   "export onnx --base demo")  # fmt: skip


def test_train_help_describes_every_option_one_way():
    from catfast.cli import train_command

    for param in train_command.params:
        if param.name != "help":
            assert param.help and len(param.help) > 3, f"--{param.name} has no description"
    text = " ".join(invoke("train", "-h").output.split())
    assert text.count("[required unless set in --config]") == 4  # base, data, trigger, out
    for option, default in (("--seed", "42"), ("--lr-schedule", "constant"), ("--warmup-steps", "0"),
                            ("--timesteps", "uniform"), ("--mixed-precision", "no"),
                            ("--steps", "900; 300 on --base demo")):  # fmt: skip
        after = text[text.index(option + " ") :]
        assert f"[default: {default}]" in after[:400], option
    assert "[900]" not in text and "[42]" not in text  # the old second style


def test_one_format_name_and_serving_named(adapter_file):
    assert json.loads(invoke("adapter", "info", adapter_file, "--json").output)["format"] == "diffusers"
    assert "format:      diffusers" in invoke("adapter", "info", adapter_file).output
    assert "peft" not in invoke("adapter", "--help").output
    help_text = " ".join(invoke("--help").output.split())
    assert "serve (many adapters" in help_text and "planned" not in help_text and "serve " in help_text
    pyproject = (ROOT / "pyproject.toml").read_text()
    description = next(line for line in pyproject.splitlines() if line.startswith("description"))
    assert "serving" in description and "planned" not in description


def test_readme_names_match_the_cli():
    readme = (ROOT / "README.md").read_text()
    from catfast.cli import models_init

    names = models_init.params[0].type.choices
    sep = "\\|"  # a | inside a Markdown table cell
    assert f"`catfast models init {sep.join(names)} DIR`" in readme
    assert "samples/step-0000150.png" in readme and "step-N.png" not in readme


def test_grids_carry_row_and_column_labels(tmp_path):
    from catfast.eval.grids import save_grid

    cells = [Image.new("RGB", (32, 32), (200, 0, 0)) for _ in range(6)]
    save_grid(cells, 2, 3, tmp_path / "g.png", labels=["base", "with trigger"], col_labels=["seed 0", "1", "2"])
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape[0] > 2 * 32  # a header band above the cells
    header = grid[: grid.shape[0] - 64]
    assert (header < 128).all(axis=-1).any()  # dark label text drawn in it


def test_a_disk_error_mid_write_is_one_line_and_leaves_no_partial_file(tmp_path):
    import resource
    import signal

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    big = LoraAdapter({key: LoraLayer(torch.randn(16, 256, generator=g), torch.randn(256, 16, generator=g), 8.0)})
    src = tmp_path / "big.safetensors"
    write_adapter(big, src)  # 32 KiB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # a real write failure (EFBIG), as a full disk gives
    try:
        r = invoke("adapter", "convert", src, tmp_path / "k.safetensors", "--to", "kohya")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    one_line_error(r, "too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
