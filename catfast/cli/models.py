"""`catfast env`, `catfast models init` and `catfast cat-step`: the environment, random models, a few CAT steps."""

from __future__ import annotations

import click

from catfast.cli.base import _friendly, main


@main.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print the probes as JSON.")
def env_command(as_json: bool) -> None:
    """Show versions and which accelerations are available, with reasons."""
    from catfast import env  # lazy: startup

    env.main(["--json"] if as_json else [])


@main.group()
def models() -> None:
    """Random-weight base models for tests, benchmarks and trying catfast offline."""


@models.command("init")
@click.argument(
    "name", type=click.Choice(["tiny", "tiny-sdxl", "small", "sd15", "sdxl", "tiny-flux", "tiny-sd3", "tiny-qwenimage"])
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@_friendly
def models_init(name: str, out_dir: str, seed: int, overwrite: bool) -> None:
    """Write a complete diffusers folder NAME (random weights) to OUT_DIR, usable as --base."""
    from catfast.integrations.factory import init_model_folder  # lazy: startup

    path = init_model_folder(name, out_dir, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {name} model to {path}")


@main.command("cat-step")
@click.option(
    "--base",
    required=True,
    type=click.Path(),
    help="Base model: a diffusers folder, a single-file SD1.x/SDXL checkpoint (.safetensors), or demo.",
)
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
    from catfast.train.quickstart import run_cat_steps  # lazy: startup

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
