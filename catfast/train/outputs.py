"""What a training run writes in OUT, besides checkpoints (``catfast.train.checkpoint``): the folder checks
before any model work, config.json, metrics.jsonl and loss.png, the sample grids, and the adapter file(s).
Only rank 0 writes; ``dist`` (``catfast.train.dist.Dist``) keeps the ranks in step around the writes."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from catfast.adapters.adapter import LoraAdapter, LoraLayer, layer_key
from catfast.adapters.formats import write_adapter
from catfast.errors import CatfastError
from catfast.eval.grids import save_grid
from catfast.eval.sampler import sample_images
from catfast.folders import ensure_writable_folder, write_atomic
from catfast.train.captions import has_trigger, strip_trigger
from catfast.train.checkpoint import check_resumable, list_checkpoints
from catfast.train.config import TrainConfig
from catfast.train.dist import Dist
from catfast.train.lifelong import TRIGGER_PROMPTS, trigger_prompts_metadata

METRICS = "metrics.jsonl"
# Files a run writes in OUT (an --overwrite run removes them first; the latent cache is kept).
OUTPUTS = ("checkpoints", "samples", METRICS, "loss.png", "config.json")


def prepare_out(
    out: Path, config: TrainConfig, dist: Dist, *, resume: bool, overwrite: bool
) -> tuple[Path | None, list[str]]:
    """Check (and on rank 0 create) OUT before any model work. Returns the checkpoint to resume from (or
    None) and the names of an earlier run's files in OUT, which `start_out` replaces once the inputs
    passed their checks (a run that fails them leaves OUT as it was)."""
    if out.exists() and not out.is_dir():
        raise CatfastError(f"{out}: the output path exists and is not a folder")
    ckpt_dir = out / "checkpoints"
    if resume:
        if overwrite:
            raise CatfastError("--resume continues the run in OUT and --overwrite starts it over; pass one")
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise CatfastError(f"--resume: no checkpoint in {ckpt_dir}; start the run without --resume")
        step, latest = found[-1]
        check_resumable(latest, config, dist.world)
        if step >= config.steps:
            raise CatfastError(f"--resume: {latest} is at step {step}, and steps is {config.steps}; raise --steps")
        return latest, []
    ours = [name for name in OUTPUTS if (out / name).exists()] + [p.name for p in adapter_files(out)]
    if ours and not overwrite:
        hint = "pass --resume to continue it, or " if list_checkpoints(ckpt_dir) else ""
        raise CatfastError(
            f"{out} holds an earlier run ({', '.join(sorted(ours))}); {hint}pass --overwrite to start over"
        )
    dist.barrier()  # every rank has looked at OUT before rank 0 writes to it
    if dist.main:
        ensure_writable_folder(out, CatfastError)
    dist.barrier()
    return None, ours


def start_out(out: Path, earlier: list[str], config: TrainConfig, dist: Dist) -> None:
    """Remove an earlier run's files (``--overwrite``; the latent cache is kept) and write config.json."""
    if dist.main:
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        write_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True).encode())
    dist.barrier()


def adapter_files(out: Path) -> list[Path]:
    return sorted(out.glob("adapter*.safetensors")) if out.is_dir() else []


class MetricsWriter:
    """Appends one JSON line per step to metrics.jsonl, flushed, and keeps the losses for loss.png."""

    def __init__(self, path: Path, history: list[float]):
        self.path, self.losses = path, list(history)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.losses.append(record["loss"])

    def plot(self, path: Path) -> None:
        if self.losses:
            write_loss_plot(self.losses, path)

    def close(self) -> None:
        self.file.close()


def log_step(metrics: MetricsWriter | None, bar, step: int, last: dict[str, float], *, lr: float, seconds: float,
             mode: str, reason: str | None, config_lr: float, check_finite: bool = True) -> None:  # fmt: skip
    """One finished step: a CatfastError naming ``config_lr`` (the run's setting) when ``check_finite`` and the
    loss (``last["loss"]``) is not finite; the metrics line with the step's ``lr`` (rank 0: ``metrics`` not None;
    ``reason``: why this ``mode``, on the lines that carry it); the progress bar moved (None: no bar)."""
    loss = last["loss"]
    if check_finite and not math.isfinite(loss):
        raise CatfastError(f"the loss is {loss} at step {step}; lower the lr ({config_lr}) or check the data")
    if metrics is not None:
        record = {"step": step, **last, "lr": lr, "seconds": round(seconds, 6), "mode": mode}
        if reason is not None:
            record["mode_reason"] = reason
        metrics.write(record)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", ldm=f"{last['ldm']:.4f}", cat=f"{last['cat']:.2e}", refresh=False)
        bar.update(1)


def truncate_metrics(path: Path, step: int) -> list[float]:
    """Drop the lines of steps after ``step`` (a killed run went past its last checkpoint); returns the
    losses of the remaining lines."""
    if not path.is_file():
        return []
    kept, losses = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
            losses.append(record["loss"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return losses


def write_loss_plot(losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A PNG line plot of the per-step loss (grey) and its moving average (blue), drawn with PIL."""
    w, h = size
    left, right, top, bottom = 56, 12, 12, 28
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    finite = [v for v in losses if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(losses)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, n - 1))
        return x, top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    window = max(1, n // 20)
    smooth, acc = [], 0.0
    for i, v in enumerate(losses):
        acc += v if math.isfinite(v) else 0.0
        if i >= window:
            acc -= losses[i - window] if math.isfinite(losses[i - window]) else 0.0
        smooth.append(acc / min(i + 1, window))
    for series, color in ((losses, (170, 170, 170)), (smooth, (31, 119, 180))):
        points = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=1 if color[0] == 170 else 2)
    draw.text((4, top), f"{hi:.4g}", fill="black")
    draw.text((4, h - bottom - 10), f"{lo:.4g}", fill="black")
    draw.text((left, h - bottom + 6), "step 1", fill="black")
    draw.text((w - right - 60, h - bottom + 6), f"step {n}", fill="black")
    draw.text((left + 8, top + 4), "loss", fill=(31, 119, 180))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


class SamplePlan:
    """The sample grid: per prompt (and concept) one row of base | adapter without the trigger |
    adapter with the trigger, from one batched sampler run with fixed seeds."""

    def __init__(self, config: TrainConfig, examples, names: list[str]):
        self.config = config
        rows = []  # (label, prompt without trigger, prompt with trigger, adapter name)
        for k, concept in enumerate(config.concepts):
            adapter = names[k] if len(names) > 1 else names[0]
            prompts = config.sample_prompts or [next(e.caption_stripped for e in examples if e.concept == k)]
            for prompt in prompts:
                trigger = concept.trigger
                if has_trigger(prompt, trigger):
                    with_t, without = prompt, strip_trigger(prompt, trigger)
                else:
                    with_t, without = f"{trigger}, {prompt}", prompt
                rows.append((f"{trigger}: {without}"[:60], without, with_t, adapter))
        self.rows = rows

    def run(self, base, path: Path) -> None:
        prompts, adapters, seeds = [], [], []
        cols = 3 if self.config.sample_base else 2
        for i, (_, without, with_t, adapter) in enumerate(self.rows):
            row = ([(without, None)] if self.config.sample_base else []) + [(without, adapter), (with_t, adapter)]
            for prompt, name in row:
                prompts.append(prompt)
                adapters.append(name)
                seeds.append(self.config.sample_seed + i)
        with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG
            images = sample_images(
                base,
                prompts,
                adapters=adapters,
                seeds=seeds,
                steps=self.config.sample_steps,
                guidance=self.config.sample_guidance,
            )
        labels = [f"{r[0]} (seed {self.config.sample_seed + i})" for i, r in enumerate(self.rows)]
        heads = (["base"] if self.config.sample_base else []) + ["without trigger", "with trigger"]
        save_grid(images, len(self.rows), cols, path, labels=labels, col_labels=heads)


def trained_adapters(
    params: dict[str, torch.Tensor], config: TrainConfig, names: list[str], examples, step: int
) -> dict[str, tuple[LoraAdapter, list[str]]]:
    """{file name: (adapter, its triggers)} of the trainable LoRA parameters ``params`` (peft names,
    ``<module>.lora_A.<adapter name>.weight``) after ``step`` steps: adapter.safetensors, or
    adapter-<trigger>.safetensors per concept. The metadata records the triggers, the steps and the
    training captions (`--keep` distills on them later). The final adapter and every checkpoint's come
    from here, so a checkpoint's file is the same kind of adapter as the final one."""
    files = {}
    for k, name in enumerate(names):
        layers = {}
        for key, down in params.items():
            module, sep, tail = key.rpartition(".lora_A.")
            if not sep or tail != f"{name}.weight":
                continue
            up = params[f"{module}.lora_B.{tail}"]
            layers[layer_key("unet", module)] = LoraLayer(
                down=down.detach().to("cpu", copy=True), up=up.detach().to("cpu", copy=True), alpha=config.lora_alpha
            )
        if not layers:
            raise CatfastError(f"no LoRA parameters of adapter {name!r} to write")
        adapter = LoraAdapter(layers=layers, source_format="memory")
        triggers = [c.trigger for c in config.concepts] if len(names) == 1 else [config.concepts[k].trigger]
        adapter.metadata.update({"catfast.triggers": json.dumps(triggers), "catfast.steps": str(step)})
        mine = [e.caption for e in examples if len(names) == 1 or e.concept == k]
        adapter.metadata[TRIGGER_PROMPTS] = trigger_prompts_metadata(mine)
        if len(names) == 1:
            file = "adapter.safetensors"
        else:
            file = f"adapter-{re.sub(r'[^A-Za-z0-9_.-]+', '_', triggers[0])}.safetensors"
        files[file] = (adapter, triggers)
    return files


def write_adapters(params, config: TrainConfig, names: list[str], out: Path, examples) -> dict[str, Path]:
    """The final adapter file(s) (`trained_adapters`) in OUT; returns {trigger: file}."""
    files = {}
    for file, (adapter, triggers) in trained_adapters(params, config, names, examples, config.steps).items():
        path = out / file
        try:
            write_adapter(adapter, path, format=config.format, overwrite=True)
        except OSError as e:
            raise CatfastError(f"{path}: cannot write the adapter: {e.strerror or e}") from None
        for trigger in triggers:
            files[trigger] = path
    return files
