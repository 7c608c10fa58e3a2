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


if __name__ == "__main__":
    sys.exit(main())
