"""The `catfast` command. Each subcommand parses options and calls one library function; errors
catfast raises on purpose (CatfastError) print as one line and exit 1, without a traceback.

Nothing heavy is imported at module level or in `main`: torch, diffusers, transformers, peft and onnx
are imported inside the subcommand that uses them, so `catfast --help`, `catfast adapter info` and
`catfast env` start in a fraction of the time a model-loading command needs (tests/test_cli_fast.py).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from catfast.errors import CatfastError


def _friendly(fn):
    """Turn CatfastError, and an OS error (a disk that fills up mid-run, a folder that vanished), into a
    one-line click error. Output places are checked before any work, so the OS error is a last resort."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CatfastError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="catfast")
def main() -> None:
    """catfast: train (CAT), serve (many adapters, mixed in one batch) and export LoRA adapters for
    Stable-Diffusion UNets.

    Every command that takes a base model accepts `--base demo`, the small demo model shipped in the
    package (no download)."""


def _set_threads(threads: int | None, default: int | None, echo=functools.partial(click.echo, err=True)) -> int:
    """Set torch's CPU thread count: ``threads`` when given, else ``default`` (None: torch's own, one per
    core). Prints a note when the machine is already busy (1-minute load average + our threads above
    the core count): then threads spin against other processes, and fewer threads are faster."""
    import os

    import torch

    n = threads or default or torch.get_num_threads()
    torch.set_num_threads(n)
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return n
    if load + n > cores + 0.5:
        echo(
            f"note: this machine is busy (load {load:.1f} on {cores} cores) and catfast uses {n} thread(s): "
            "expect slower runs than the README's timings (an idle machine); with other work running, "
            "--threads 1 is the most robust choice"
        )
    return n


_THREADS_HELP = "CPU threads for torch"
DEMO_THREADS = 1  # the demo's UNet is tiny: a second thread gains little, and on a busy CPU it spins
DEMO_TIME = "about 2 min on an idle 2-core CPU, 1 thread"  # README states the same; measured in the lead's merge


@main.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print the probes as JSON.")
def env_command(as_json: bool) -> None:
    """Show versions and which accelerations are available, with reasons."""
    from catfast import env

    env.main(["--json"] if as_json else [])


@main.group()
def models() -> None:
    """Random-weight base models for tests, benchmarks and trying catfast offline."""


@models.command("init")
@click.argument("name", type=click.Choice(["tiny", "tiny-sdxl", "small", "sd15", "sdxl"]))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@_friendly
def models_init(name: str, out_dir: str, seed: int, overwrite: bool) -> None:
    """Write a complete diffusers folder NAME (random weights) to OUT_DIR, usable as --base."""
    from catfast.integrations.factory import init_model_folder

    path = init_model_folder(name, out_dir, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {name} model to {path}")


@main.command("cat-step")
@click.option("--base", required=True, type=click.Path(), help="Base model: a diffusers folder, or demo.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option(
    "--caption",
    default="sks, a star on a plain background",
    show_default=True,
    help="Training caption; must contain the trigger.",
)
@click.option("--trigger", default="sks", show_default=True, help="The trigger word of the caption.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Training image (default: a drawn star).")
@click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--alpha", default=4.0, show_default=True, type=float, help="LoRA alpha (scale alpha / rank).")
@click.option("--cat-weight", default=1.0, show_default=True, type=click.FloatRange(min=0), help="CAT term weight.")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="AdamW learning rate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the noise, timesteps and LoRA init.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the trained adapter here (diffusers format).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@_friendly
def cat_step(base, steps, caption, trigger, image, rank, alpha, cat_weight, lr, seed, out, overwrite) -> None:
    """Take a few reference CAT training steps on one image (a smoke run of the whole path)."""
    from catfast.train.quickstart import run_cat_steps

    try:
        records = run_cat_steps(
            base,
            steps=steps,
            caption=caption,
            trigger=trigger,
            image_path=image,
            rank=rank,
            alpha=alpha,
            cat_weight=cat_weight,
            lr=lr,
            seed=seed,
            out=out,
            overwrite=overwrite,
        )
    except ValueError as e:  # a caption without the trigger
        raise click.ClickException(str(e)) from None
    for r in records:
        click.echo(f"step {r.step}: loss {r.loss:.5f}  ldm {r.ldm:.5f}  cat {r.cat:.3e}  ({r.seconds * 1e3:.0f} ms)")
    if out:
        click.echo(f"wrote adapter to {out}")


def _set_option(ctx, param, values) -> dict:
    """``--set KEY=VALUE`` pairs; VALUE is read as a TOML value (42, 1e-4, true, ["a", "b"]) or a string."""
    import tomllib

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def _default(name: str) -> str:
    """`train -h`'s default of option ``name``, from TrainConfig, in click's own "[default: X]" form."""
    from catfast.train.config import TrainConfig

    value = getattr(TrainConfig(), name)
    if value is None or isinstance(value, bool):
        value = "on" if value else "off"
    return f"[default: {value}]"


_REQUIRED = "[required unless set in --config]"


@main.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML, YAML or JSON file of options.")
@click.option(
    "--base",
    help="Base model: a diffusers folder, a hub id (owner/name), a UNet file with --base-config, or demo "
    f"(the shipped demo model). {_REQUIRED}",
)
@click.option("--base-config", help="The diffusers folder that completes a single-file --base.")
@click.option("--data", help=f"Folder of images with .txt captions or a metadata.jsonl. {_REQUIRED}")
@click.option("--trigger", help=f"The trigger word every caption contains. {_REQUIRED}")
@click.option("--out", help=f"Output folder (adapter, metrics, samples, checkpoints). {_REQUIRED}")
@click.option("--steps", type=click.IntRange(min=1), help=f"Optimizer steps. {_default('steps')}")
@click.option("--seed", type=int, help=f"Seed of the LoRA init, data order, noise and timesteps. {_default('seed')}")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    help=f"Steps between checkpoints (the last step is always one); 0: none. {_default('checkpoint_every')}",
)
@click.option(
    "--sample-every",
    type=click.IntRange(min=0),
    help=f"Steps between sample grids (and one at the end); 0: none. {_default('sample_every')}",
)
@click.option(
    "--sample-prompt",
    "sample_prompts",
    multiple=True,
    help="Sample prompt without the trigger (repeatable). [default: the first training caption, stripped]",
)
@click.option("--rank", type=click.IntRange(min=1), help=f"LoRA rank. {_default('rank')}")
@click.option("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha / rank. [default: rank]")
@click.option("--lr", type=float, help=f"AdamW learning rate. {_default('lr')}")
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine", "linear"]),
    help=f"Learning-rate schedule after warmup (cosine/linear decay to 0 at --steps). {_default('lr_schedule')}",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    help=f"Steps of linear lr warmup from 0. {_default('warmup_steps')}",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help=f"Images per step, per process. {_default('batch_size')}"
)
@click.option(
    "--grad-accum", type=click.IntRange(min=1), help=f"Micro-batches per optimizer step. {_default('grad_accum')}"
)
@click.option(
    "--resolution", type=click.IntRange(min=8), help="Training size in pixels. [default: the model's native size]"
)
@click.option("--allow-upscale", is_flag=True, default=None, help="Accept images smaller than --resolution (enlarged).")
@click.option(
    "--cat-weight",
    type=click.FloatRange(min=0),
    help=f"Weight (lambda) of the CAT term; 0: plain LoRA. {_default('cat_weight')}",
)
@click.option("--snr-gamma", type=float, help="Min-SNR-gamma loss weighting (e.g. 5). [default: off]")
@click.option(
    "--timesteps",
    type=click.Choice(["uniform", "chain-of-forgetting"]),
    help=f"Training timestep distribution (chain-of-forgetting favours noisy steps). {_default('timesteps')}",
)
@click.option(
    "--cat-prompts",
    help="CAT preservation prompts: stripped (the paper's: the training captions without the trigger), "
    "stripped+empty (also the empty prompt guidance subtracts) or a FILE of extra prompts, one a line "
    f"(docs/retention.md). {_default('cat_prompts')}",
)
@click.option("--bank", help="Knowledge bank folder (`catfast bank make`): replay base-model samples. [default: off]")
@click.option(
    "--bank-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), help=f"{_default('bank_ratio')}"
)
@click.option("--bank-weight", type=click.FloatRange(min=0), help=f"Weight of the bank term. {_default('bank_weight')}")
@click.option(
    "--keep",
    multiple=True,
    callback=lambda ctx, param, values: [p for v in values for p in v.split(",") if p] or None,
    help="Adapters to keep working (frozen, merged, distilled on their recorded trigger prompts): "
    "A.safetensors[,B...] (repeatable). [default: none]",
)
@click.option("--keep-weight", type=click.FloatRange(min=0), help=f"Weight of the keep term. {_default('keep_weight')}")
@click.option(
    "--mixed-precision",
    type=click.Choice(["no", "bf16", "fp16"]),
    help=f"Run the frozen UNet in half precision (LoRA weights stay fp32). {_default('mixed_precision')}",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute UNet activations in backward: less memory, more time. [default: off]",
)
@click.option("--max-grad-norm", type=float, help=f"Clip the LoRA gradients' norm. {_default('max_grad_norm')}")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["diffusers", "kohya"]),
    help=f"Adapter file format. {_default('format')}",
)
@click.option(
    "--prepend-trigger/--no-prepend-trigger",
    default=None,
    help="Put the trigger before captions that lack it. [default: off]",
)
@click.option(
    "--on-bad-image",
    type=click.Choice(["stop", "skip"]),
    help=f"Unreadable images: stop or skip. {_default('on_bad_image')}",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "fused", "reference"]),
    help="CAT step implementation; auto picks the faster exact one for the device (recorded in metrics.jsonl). "
    f"{_default('mode')}",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    help=f"auto: cuda when torch sees a GPU. {_default('device')}",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help=f"{_THREADS_HELP} (a CPU run; not a result setting). [default: one per core]",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    callback=_set_option,
    metavar="KEY=VALUE",
    help="Any config option (repeatable); a flag given for the same option wins over --set.",
)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--overwrite", is_flag=True, help="Start over in an OUT that holds an earlier run.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def train_command(config_file, settings, resume, overwrite, no_progress, format_, sample_prompts, threads, **flags):
    """Train a CAT LoRA adapter on a folder of captioned images (multi-concept via a config's concepts).

    Every option can also be set in --config or with --set KEY=VALUE. Precedence: a flag, then --set,
    then the config file, then the default (defaults follow the CAT paper)."""
    from catfast.train.config import TrainConfig
    from catfast.train.trainer import train

    flags.update(format=format_, sample_prompts=list(sample_prompts) or None)
    config = TrainConfig.load(config_file, merge_overrides(settings, flags))
    import torch

    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        _set_threads(threads, None)  # a CPU run: threads matter (on a GPU, torch's default is left alone)
    result = train(config, resume=resume, overwrite=overwrite, progress=not no_progress)
    if not result.adapters:  # a rank other than 0 under torchrun
        return
    done = result.steps - result.start_step
    from_step = f" (resumed at step {result.start_step})" if result.start_step else ""
    click.echo(f"trained {done} steps{from_step} in {result.seconds:.1f} s ({result.seconds / done:.2f} s per step)")
    for path in dict.fromkeys(result.adapters.values()):
        click.echo(f"wrote adapter to {path}")


def merge_overrides(settings: dict, flags: dict) -> dict:
    """`catfast train`'s overrides of the config file: ``--set`` values, then every flag that was given
    (a flag left out is None and does not hide a ``--set`` of the same option). Keys use underscores."""
    merged = {k.replace("-", "_"): v for k, v in settings.items()}
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


@main.group("eval")
def eval_group() -> None:
    """Evaluate adapters."""


@eval_group.command("kps")
@click.option("--base", required=True, type=click.Path(), help="Base model: a diffusers folder, or demo.")
@click.option("--adapter", "adapter_file", required=True, type=click.Path(exists=True), help="Adapter file.")
@click.option(
    "--prompts", "prompts_file", required=True, type=click.Path(exists=True), help="Class prompts, one per line."
)
@click.option("--clip", "clip_path", required=True, type=click.Path(exists=True), help="Local CLIP model folder.")
@click.option("--trigger", required=True, help="The adapter's trigger word.")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(min=1), help="Seeds per prompt.")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1), help="DDIM steps.")
@click.option("--guidance", default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--references", type=click.Path(exists=True), help="The concept's images (identity is scored on them).")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), help="Also write the images as a PNG grid.")
@click.option("--out-json", type=click.Path(dir_okay=False), help="Write the full result as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the totals as one JSON object.")
@_friendly
def eval_kps_command(
    base, adapter_file, prompts_file, clip_path, trigger, seeds, steps, guidance, references, grid_path, out_json,
    as_json,
) -> None:  # fmt: skip
    """Knowledge preservation (KPS): base / adapter without trigger / adapter with trigger, in one sampler run."""
    from catfast.eval.kps import format_kps_table, run_kps_cli

    result = run_kps_cli(
        base, adapter_file, prompts_file, clip_path, trigger, seeds, steps, out_json,
        references=references, guidance=guidance, grid_path=grid_path, progress=not as_json,
    )  # fmt: skip
    click.echo(json.dumps(result["total"]) if as_json else format_kps_table(result))


@main.group()
def adapter() -> None:
    """Inspect and convert LoRA adapter files (diffusers and kohya safetensors)."""


@adapter.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_friendly
def adapter_info(file: str, as_json: bool) -> None:
    """Format, rank per layer, alpha, targets and parameter count of FILE."""
    from catfast.adapters.formats import read_adapter

    info = read_adapter(file).describe()
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(_format_info(file, info))


def _format_info(file: str, info: dict) -> str:
    ranks = sorted(set(info["ranks"].values()))
    alphas = sorted(set(info["alphas"].values()))
    lines = [
        f"file:        {file}",
        f"format:      {info['format']} ({info['keys']} keys)",
        f"components:  {', '.join(info['components'])}",
        f"layers:      {info['num_layers']}",
        f"rank:        {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]} (varies per layer)'}",
        f"alpha:       {alphas[0] if len(alphas) == 1 else f'{alphas[0]}..{alphas[-1]} (varies per layer)'}",
        f"targets:     {', '.join(info['targets'])}",
        f"parameters:  {info['num_parameters']:,}",
    ]
    if len(ranks) > 1 or len(alphas) > 1:
        lines.append("per layer (rank, alpha):")
        lines += [f"  {name}: {info['ranks'][name]}, {info['alphas'][name]}" for name in sorted(info["ranks"])]
    return "\n".join(lines)


@adapter.command("convert")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--to", "to_format", required=True, type=click.Choice(["kohya", "diffusers"]), help="Output format.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@_friendly
def adapter_convert(src: str, dst: str, to_format: str, overwrite: bool) -> None:
    """Convert SRC to DST in another format, keeping ranks and alphas (so the output is unchanged)."""
    from catfast.adapters.formats import read_adapter, write_adapter
    from catfast.folders import check_output_file

    check_output_file(dst, overwrite, CatfastError)  # before reading: a bad DST fails at once
    adapter_obj = read_adapter(src)
    write_adapter(adapter_obj, dst, format=to_format, overwrite=overwrite)
    click.echo(f"wrote {to_format} adapter ({len(adapter_obj.layers)} layers) to {dst}")


@main.group("export")
def export_group() -> None:
    """Export a base model with LoRA adapters (ONNX)."""


@export_group.command("onnx")
@click.option(
    "--base", required=True, type=click.Path(), help="Base model: a diffusers folder (read, never written), or demo."
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="[NAME=]FILE[:SCALE]",
    help="LoRA file to apply (repeatable); NAME names it in the export; SCALE multiplies its alpha/r (default 1).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the export to.")
@click.option("--fp16", is_flag=True, help="Export fp16 weights and inputs (validated against fp32 PyTorch).")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (14..20).")
@click.option(
    "--components",
    default="unet",
    show_default=True,
    help="Comma-separated: unet,text_encoder,vae_decoder. The default (UNet only) is for your own pipeline: "
    "`catfast run-onnx` needs all three.",
)
@click.option("--dynamic", is_flag=True, help="Dynamic height/width and text length (batch is always dynamic).")
@click.option(
    "--adapter-inputs",
    is_flag=True,
    help="One graph whose LoRA A/B are (optional) inputs; per-adapter weights are written next to it.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists and is not empty.")
@_friendly
def export_onnx_command(base, adapters, out, fp16, opset, components, dynamic, adapter_inputs, overwrite) -> None:
    """Merge adapters into a copy of BASE (or make them graph inputs), export to ONNX, check every graph
    with onnx.checker and against PyTorch in ONNX Runtime, and write OUT/manifest.json."""
    from catfast.export.onnx import export_onnx

    manifest = export_onnx(
        base,
        out,
        adapters=adapters,
        components=[c.strip() for c in components.split(",") if c.strip()],
        fp16=fp16,
        opset=opset,
        dynamic=dynamic,
        adapter_inputs=adapter_inputs,
        overwrite=overwrite,
        log=click.echo,
    )
    for name, comp in manifest["components"].items():
        v = comp["validation"]
        click.echo(
            f"{name}: {comp['file']} ({comp['bytes'] / 1e6:.1f} MB), max abs err {v['max_abs_err']:.2e}, "
            f"max rel err {v['max_rel_err']:.2e} <= {v['tolerance']:.0e} ({comp['dtype']})"
        )
    missing = [c for c in ("unet", "text_encoder", "vae_decoder") if c not in manifest["components"]]
    if missing:
        click.echo(
            f"note: no {', '.join(missing)} in this export, so `catfast run-onnx` cannot run it; for an image "
            "runner export --components unet,text_encoder,vae_decoder"
        )


@main.command("run-onnx")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(),
    help="Folder written by `catfast export onnx --components unet,text_encoder,vae_decoder`.",
)
@click.option("--prompt", required=True)
@click.option("--adapter", default=None, help="Adapter NAME of an --adapter-inputs export (default: the base).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write (atomically).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--negative-prompt", default="", show_default=True, help="What the guidance steers away from.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="DDIM steps.")
@click.option("--guidance-scale", default=7.5, show_default=True, type=float, help="Classifier-free guidance.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Pixels. [default: the model's native size]")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Pixels. [default: the model's native size]")
@click.option(
    "--provider", default=None, help="ONNX Runtime execution provider. [default: CUDA if it starts, else CPU]"
)
@_friendly
def run_onnx_command(
    model_dir, prompt, adapter, out, overwrite, negative_prompt, steps, guidance_scale, seed, height, width, provider
):
    """Generate an image with ONNX Runtime alone (tokenizer, text encoder, DDIM UNet loop, VAE decoder)."""
    from catfast.export.runner import run_onnx

    if model_dir == "demo" and not Path(model_dir).exists():
        raise click.ClickException(
            "run-onnx runs an ONNX export, and the demo model ships as PyTorch weights: export it first with "
            "`catfast export onnx --base demo --components unet,text_encoder,vae_decoder --out DIR`, then "
            "pass --model DIR"
        )
    path, used = run_onnx(
        model_dir,
        prompt,
        out,
        adapter=adapter,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        height=height,
        width=width,
        provider=provider,
        overwrite=overwrite,
    )
    click.echo(f"wrote {path} ({used}, {steps} steps)")


@main.group()
def bench() -> None:
    """Benchmarks run in one process against the baseline, interleaved."""


@bench.command("onnx")
@click.option("--model", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "sd15"]))
@click.option("--reps", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_onnx_command(model, reps, batch, rank, as_json) -> None:
    """UNet latency in ONNX Runtime (each provider that starts here; merged and adapter inputs) against
    PyTorch with the same merged weights."""
    from catfast.export.bench import bench_onnx

    result = bench_onnx(model, reps=reps, batch=batch, rank=rank, log=(lambda s: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{model} UNet, batch {batch}, {result['device']}, median of {reps}:")
    for name, ms in result["median_ms"].items():
        click.echo(f"  {name:<45} {ms:9.2f} ms")


@bench.command("train-step")
@click.option(
    "--model", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "sd15-narrow", "sd15", "sdxl"])
)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Timed steps per entry.")
@click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option(
    "--targets",
    default="to_q,to_k,to_v,to_out.0",  # the CAT paper's targets (bench_step.TARGETS)
    show_default=True,
    help="LoRA target modules, comma-separated (add conv1,conv2,conv,conv_shortcut for kohya LoCon).",
)
@click.option(
    "--against",
    default="official,ai-toolkit,kohya",
    show_default=True,
    help="Today's CAT / preservation steps to time against, comma-separated (empty: none).",
)
@click.option(
    "--mixed-precision",
    default="no",
    show_default=True,
    type=click.Choice(["no", "bf16", "auto"]),
    help="bf16 autocast for every entry (auto: where the device supports it).",
)
@click.option("--memory/--no-memory", default=True, show_default=True, help="Peak RSS, one process per entry (CPU).")
@click.option(
    "--compile/--no-compile",
    "compile_reference",
    default=False,
    show_default=True,
    help="Also time the reference step through torch.compile (minutes of compiling at SD1.5 size).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_train_step_command(
    model, batch, steps, rank, dtype, targets, against, mixed_precision, memory, compile_reference, as_json
):
    """catfast's CAT step modes against today's CAT steps (official CAT, ai-toolkit and kohya DOP),
    interleaved in one process: time, FLOPs and their share of the GEMM rate, memory, parity."""
    from catfast.train.bench_step import bench_train_step
    from catfast.train.contestants import check_names

    result = bench_train_step(
        model,
        batch,
        steps,
        rank=rank,
        dtype=dtype,
        targets=targets.split(","),
        against=check_names(against.split(",")),
        mixed_precision=mixed_precision,
        memory=memory,
        compile_reference=compile_reference,
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"{model} UNet, batch {batch}, {dtype} ({result['mixed_precision_reason']}), {result['device']}, "
        f"median of {steps} steps; GEMM rate {result['gemm_flops'] / 1e9:.1f} GFLOP/s"
    )
    for section in ("modes", "against"):
        for name, m in result[section].items():
            flops = f"{m['achieved_flops'] / 1e9:6.1f} GFLOP/s ({m['gemm_fraction']:.0%} of GEMM)"
            peak = f"peak {m['peak_bytes'] / 2**20:7.0f} MiB" if m["peak_bytes"] else ""
            parity = f"loss/grad rel err {m['loss_rel_err']:.0e}/{m['grad_rel_err']:.0e}" if "loss_rel_err" in m else ""
            click.echo(
                f"  {name:<20} {m['median_ms']:10.1f} ms  {flops}  params {m['param_bytes'] / 2**20:6.0f} MiB  "
                f"{peak}  {parity}"
            )
    click.echo(f"  auto -> {result['auto']['mode']}: {result['auto']['reason']}")
    for name, ratio in result["default_vs"].items():
        click.echo(f"  catfast's default step is {ratio:.2f}x the {name} step's speed")


@bench.command("serve")
@click.option("--model", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "sd15"]))
@click.option("--registered", default="1,64,1024", show_default=True, help="Adapter counts registered for the switch.")
@click.option("--mixed", default="1,4,16", show_default=True, help="Distinct adapters in the one-step batch.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1), help="Rows of the one-step batch.")
@click.option("--requests", default=64, show_default=True, type=click.IntRange(min=1), help="Throughput requests.")
@click.option("--adapters", default=16, show_default=True, type=click.IntRange(min=1), help="Throughput adapters.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Denoising steps per request.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1), help="Engine's max batch.")
@click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--diffusers-max", default=1024, show_default=True, type=click.IntRange(min=0),
              help="At most this many adapters loaded into the diffusers baseline (loading is slow).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_serve_command(
    model, registered, mixed, batch, requests, adapters, steps, max_batch, rank, reps, diffusers_max, as_json
) -> None:
    """The serving engine against diffusers on the same model, interleaved: adapter switch latency, one
    step with N distinct adapters in the batch, and throughput of mixed-adapter requests."""
    from catfast.serve.bench import bench_serve

    def counts(text: str, what: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise click.BadParameter(f"{what} must be positive integers, got {text!r}")
        return values

    result = bench_serve(
        model,
        registered=counts(registered, "--registered"),
        mixed=counts(mixed, "--mixed"),
        batch=batch,
        requests=requests,
        adapters=adapters,
        steps=steps,
        max_batch=max_batch,
        rank=rank,
        reps=reps,
        diffusers_max=diffusers_max,
        log=(lambda s: click.echo(s, err=True)) if as_json else click.echo,  # partial results as they come
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    sw, mx, tp = result["switch_ms"], result["mixed"], result["throughput"]
    click.echo(f"{model}, {result['device']}, {result['threads']} thread(s), median of {reps}:")
    for count in sw["resident"]:
        click.echo(
            f"  switch, {count:>5} registered: resident {sw['resident'][count]:.3f} ms, cold host "
            f"{sw['cold_host'][count]:.2f} ms, cold disk {sw['cold_disk'][count]:.1f} ms; diffusers set_adapters "
            f"{sw['diffusers_set_adapters'].get(count, float('nan')):.2f} ms, fuse "
            f"{sw['diffusers_fuse'].get(count, float('nan')):.1f} ms"
        )
    click.echo(f"  one step, {mx['rows']} rows: " + ", ".join(f"{k} {v:.1f} ms" for k, v in mx["median_ms"].items()))
    click.echo(f"  ratio 16/1: {mx.get('ratio_16')}, unmerged/merged {mx['unmerged_vs_merged']}")
    click.echo(
        f"  throughput: {tp['engine_images_per_s']} images/s vs diffusers {tp['diffusers_images_per_s']} "
        f"({tp['vs_diffusers']}x)"
    )


@main.command(
    "demo",
    help="Train plain LoRA and CAT on the shipped demo model, sample, score, and write a labelled grid "
    f"({DEMO_TIME}): CAT keeps the class diverse and preserved while learning the concept.",
)
@click.option("--out", default="catfast-demo", show_default=True, type=click.Path(), help="Folder for all results.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier demo in --out.")
@click.option("--seed", default=0, show_default=True, help="Training seed of both adapters.")
@click.option("--seeds", default=8, show_default=True, type=click.IntRange(min=2), help="Sampling seeds per prompt.")
@click.option(
    "--threads",
    default=DEMO_THREADS,
    show_default=True,
    type=click.IntRange(min=1),
    help=f"{_THREADS_HELP}; the demo's models are tiny, and on a busy CPU extra threads spin against other work.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object on the last line.")
@click.option(
    "--compare",
    help="Also train and score retention methods, comma-separated: cat, cat-guidance, bank, lifelong "
    "(docs/retention.md; several times the default run's time). [default: plain LoRA vs CAT only]",
)
@_friendly
def demo_command(out: str, overwrite: bool, seed: int, seeds: int, threads: int, as_json: bool, compare) -> None:
    """`catfast demo` (help text above: it names DEMO_TIME, the time README.md states too)."""
    from catfast.demo.run import format_table, run_demo

    _set_threads(threads, DEMO_THREADS)
    if compare is not None:
        from catfast.demo.compare import format_compare, parse_methods, run_compare, summary

        methods = parse_methods(compare)
        result = run_compare(
            out, methods, seed=seed, seeds=seeds, overwrite=overwrite, progress=not as_json, log=click.echo
        )
        click.echo(format_compare(result))
        click.echo(f"grids: {', '.join(result['grids'].values())}  ({result['seconds']:.0f} s in all)")
        if as_json:
            click.echo(json.dumps(summary(result)))
        return
    result = run_demo(out, seed=seed, seeds=seeds, overwrite=overwrite, progress=not as_json, log=click.echo)
    click.echo(format_table(result))
    click.echo(f"grid: {result['grid']}  ({result['seconds']:.0f} s in all)")
    if as_json:
        keys = ("preservation", "identity", "diversity", "kps", "train_seconds")
        summary = {m: {k: result[m][k] for k in keys} for m in ("plain", "cat")}
        summary.update(base=result["base"], seconds=result["seconds"], grid=result["grid"])
        click.echo(json.dumps(summary))


main.add_command(__import__("catfast.serve.cli", fromlist=["serve"]).serve)
main.add_command(__import__("catfast.train.bank_cli", fromlist=["bank"]).bank)

if __name__ == "__main__":
    sys.exit(main())
