"""`catfast personalize`: E4T on the shipped demo model (``catfast.e4t``)."""

from __future__ import annotations

import click

from catfast.cli.base import _friendly, _set_threads, main


@main.command("personalize")
@click.option("--image", required=True, type=click.Path(dir_okay=False), help="One picture of the concept (32 px).")
@click.option("--class", "class_word", required=True, help="The concept's class word, one token (e.g. star).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for NAME.safetensors, NAME.json.")
@click.option("--steps", default=15, show_default=True, type=click.IntRange(min=0), help="Tuning steps (0: encoder).")
@click.option("--name", default=None, help="Adapter file name (default e4t-CLASS).")
@click.option("--token", default="sks", show_default=True, help="Placeholder word that stands for the concept.")
@click.option("--cat-weight", default=0.0, show_default=True, type=float, help="Weight of the CAT term while tuning.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch threads.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of the same name in --out.")
@_friendly
def personalize_command(image, class_word, out, steps, name, token, cat_weight, seed, threads, overwrite) -> None:
    """E4T on the shipped demo model: the pretrained encoder maps IMAGE to a word embedding, then STEPS tuning
    steps of it and the domain offsets; writes a LoRA file (the embedding in its metadata) that catfast serve,
    the sampler and catfast export onnx load (docs/e4t.md)."""
    from catfast.e4t.personalize import TuneSettings, personalize  # lazy: startup

    _set_threads(threads, 1)
    settings = TuneSettings(steps=steps, cat_weight=cat_weight, seed=seed)
    result = personalize(image, class_word, out, name=name, token=token, settings=settings, overwrite=overwrite)
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(
        f"personalized in {result.seconds:.2f} s ({steps} steps; {result.total_seconds:.1f} s with loading): "
        f'{result.adapter}; prompt with "{token}, a {class_word}"'
    )
