"""The `catfast` command. Each subcommand parses options and calls one library function; errors
catfast raises on purpose (CatfastError) print as one line and exit 1, without a traceback."""

from __future__ import annotations

import functools
import json
import sys

import click

from catfast.errors import CatfastError


def _friendly(fn):
    """Turn CatfastError (and a missing input file) into a one-line click error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CatfastError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="catfast")
def main() -> None:
    """catfast: train (CAT), serve and export LoRA adapters for Stable-Diffusion UNets."""
    _quiet_library_progress_bars()


def _quiet_library_progress_bars() -> None:
    """diffusers/transformers draw a bar per component load or save; catfast draws its own per job."""
    import importlib

    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            importlib.import_module(name).disable_progress_bar()
        except ImportError:
            pass


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
@click.option("--base", required=True, type=click.Path(), help="Base model: a diffusers folder.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--caption",
    default="sks, a star on a plain background",
    show_default=True,
    help="Training caption; must contain the trigger.",
)
@click.option("--trigger", default="sks", show_default=True)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Training image (default: a drawn star).")
@click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--alpha", default=4.0, show_default=True, type=float)
@click.option("--cat-weight", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True)
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
    except (ValueError, FileExistsError) as e:
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


@main.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML, YAML or JSON file of options.")
@click.option(
    "--base", help="Base model: a diffusers folder, a hub id (owner/name), or a UNet file with --base-config."
)
@click.option("--base-config", help="The diffusers folder that completes a single-file --base.")
@click.option("--data", help="Folder of images with .txt captions or a metadata.jsonl.")
@click.option("--trigger", help="The trigger word every caption contains.")
@click.option("--out", help="Output folder (adapter, metrics, samples, checkpoints).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps [900].")
@click.option("--seed", type=int, help="[42]")
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Steps between checkpoints; 0: none [150].")
@click.option("--sample-every", type=click.IntRange(min=0), help="Steps between sample grids; 0: none [0].")
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="Sample prompt (repeatable; no trigger).")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank [1].")
@click.option("--alpha", type=float, help="LoRA alpha [= rank].")
@click.option("--lr", type=float, help="AdamW learning rate [1e-4].")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine", "linear"]), help="[constant]")
@click.option("--warmup-steps", type=click.IntRange(min=0), help="[0]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Per process [1].")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per optimizer step [1].")
@click.option("--resolution", type=click.IntRange(min=8), help="Pixels [the model's native size].")
@click.option("--cat-weight", type=click.FloatRange(min=0), help="lambda of the CAT term; 0: plain LoRA [1.0].")
@click.option("--snr-gamma", type=float, help="Min-SNR-gamma weighting [off].")
@click.option("--timesteps", type=click.Choice(["uniform", "chain-of-forgetting"]), help="[uniform]")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), help="[no]")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--max-grad-norm", type=float, help="Clip the LoRA gradients' norm [1.0].")
@click.option("--format", "format_", type=click.Choice(["diffusers", "kohya"]), help="Adapter file format.")
@click.option("--prepend-trigger/--no-prepend-trigger", default=None, help="Put the trigger before captions.")
@click.option("--on-bad-image", type=click.Choice(["stop", "skip"]), help="Unreadable images: stop or skip [stop].")
@click.option("--mode", type=click.Choice(["auto", "fused", "reference"]), help="CAT step implementation [auto].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[auto]")
@click.option("--set", "settings", multiple=True, callback=_set_option, metavar="KEY=VALUE", help="Any option.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--overwrite", is_flag=True, help="Start over in an OUT that holds an earlier run.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def train_command(config_file, settings, resume, overwrite, no_progress, format_, sample_prompts, **flags) -> None:
    """Train a CAT LoRA adapter on a folder of captioned images (multi-concept via a config's concepts).
    Every option can be set in --config; flags override it. Defaults follow the CAT paper."""
    from catfast.train.config import TrainConfig
    from catfast.train.trainer import train

    overrides = {**settings, **flags, "format": format_, "sample_prompts": list(sample_prompts) or None}
    config = TrainConfig.load(config_file, overrides)
    result = train(config, resume=resume, overwrite=overwrite, progress=not no_progress)
    if not result.adapters:  # a rank other than 0 under torchrun
        return
    rate = f", {result.steps_per_second:.3f} steps/s" if result.steps_per_second else ""
    click.echo(f"trained {result.steps - result.start_step} steps in {result.seconds:.1f} s{rate}")
    for path in dict.fromkeys(result.adapters.values()):
        click.echo(f"wrote adapter to {path}")


@main.group("eval")
def eval_group() -> None:
    """Evaluate adapters."""


@eval_group.command("kps")
@click.option("--base", required=True, type=click.Path(exists=True), help="Base model: a diffusers folder.")
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
@click.option("--grid", "grid_path", type=click.Path(), help="Also write the images as a PNG grid.")
@click.option("--out-json", type=click.Path(), help="Write the full result as JSON.")
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
    """Inspect and convert LoRA adapter files (diffusers/peft and kohya safetensors)."""


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
        f"format:      {info['format']}",
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

    adapter_obj = read_adapter(src)
    write_adapter(adapter_obj, dst, format=to_format, overwrite=overwrite)
    click.echo(f"wrote {to_format} adapter ({len(adapter_obj.layers)} layers) to {dst}")


@main.group("export")
def export_group() -> None:
    """Export a base model with LoRA adapters (ONNX)."""


@export_group.command("onnx")
@click.option("--base", required=True, type=click.Path(), help="Base model: a diffusers folder (read, never written).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="[NAME=]FILE[:SCALE]",
    help="LoRA file to apply (repeatable); SCALE multiplies its alpha/r (default 1).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the export to.")
@click.option("--fp16", is_flag=True, help="Export fp16 weights and inputs (validated against fp32 PyTorch).")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (14..20).")
@click.option(
    "--components",
    default="unet",
    show_default=True,
    help="Comma-separated: unet,text_encoder,vae_decoder (all three for `catfast run-onnx`).",
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


@main.command("run-onnx")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Folder written by `catfast export onnx`.")
@click.option("--prompt", required=True)
@click.option("--adapter", default=None, help="Adapter NAME of an --adapter-inputs export (default: the base).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--negative-prompt", default="", show_default=True)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--guidance-scale", default=7.5, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True)
@click.option("--height", type=int, default=None, help="Pixels (default: the model's native size).")
@click.option("--width", type=int, default=None, help="Pixels (default: the model's native size).")
@click.option(
    "--provider", default=None, help="ONNX Runtime execution provider (default: CUDA if it starts, else CPU)."
)
@_friendly
def run_onnx_command(
    model_dir, prompt, adapter, out, negative_prompt, steps, guidance_scale, seed, height, width, provider
):
    """Generate an image with ONNX Runtime alone (tokenizer, text encoder, DDIM UNet loop, VAE decoder)."""
    from catfast.export.runner import run_onnx

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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_train_step_command(model, batch, steps, rank, dtype, targets, against, mixed_precision, memory, as_json):
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


@main.command("demo")
@click.option("--out", default="catfast-demo", show_default=True, type=click.Path(), help="Folder for all results.")
@click.option("--seed", default=0, show_default=True, help="Training seed of both adapters.")
@click.option("--seeds", default=8, show_default=True, type=click.IntRange(min=2), help="Sampling seeds per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object on the last line.")
@_friendly
def demo_command(out: str, seed: int, seeds: int, as_json: bool) -> None:
    """Train plain LoRA and CAT on the shipped demo model, sample, score, and write a grid (a few minutes
    on a 2-core CPU): CAT keeps the class diverse and preserved while learning the concept."""
    from catfast.demo.run import format_table, run_demo

    result = run_demo(out, seed=seed, seeds=seeds, progress=not as_json, log=click.echo)
    click.echo(format_table(result))
    click.echo(f"grid: {result['grid']}  ({result['seconds']:.0f} s in all)")
    if as_json:
        keys = ("preservation", "identity", "diversity", "kps", "train_seconds")
        summary = {m: {k: result[m][k] for k in keys} for m in ("plain", "cat")}
        summary.update(base=result["base"], seconds=result["seconds"], grid=result["grid"])
        click.echo(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
