"""`catfast demo`: plain LoRA against CAT on the shipped demo model."""

from __future__ import annotations

import json

import click

from catfast.cli.base import _THREADS_HELP, DEMO_THREADS, DEMO_TIME, _friendly, _set_threads, main


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
@click.option(
    "--model",
    "model_kind",
    default="unet",
    show_default=True,
    type=click.Choice(["unet", "dit"]),
    help="The demo base: the UNet, or the Flux-style diffusion transformer (double- and single-stream blocks).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object on the last line.")
@click.option(
    "--compare",
    help="Also train and score retention methods, comma-separated: cat, cat-guidance, bank, lifelong "
    "(docs/retention.md; several times the default run's time). [default: plain LoRA vs CAT only]",
)
@_friendly
def demo_command(
    out: str, overwrite: bool, seed: int, seeds: int, threads: int, model_kind: str, as_json: bool, compare
) -> None:
    """`catfast demo` (help text above: it names DEMO_TIME, the time README.md states too)."""
    from catfast.demo.run import demo_summary, format_table, run_demo  # lazy: startup

    _set_threads(threads, DEMO_THREADS)
    if compare is not None and model_kind != "unet":
        raise click.UsageError("--compare runs on the UNet demo base only; drop --compare or --model dit")
    if compare is not None:
        from catfast.demo.compare import format_compare, parse_methods, run_compare, summary  # lazy: startup

        methods = parse_methods(compare)
        result = run_compare(
            out, methods, seed=seed, seeds=seeds, overwrite=overwrite, progress=not as_json, log=click.echo
        )
        click.echo(format_compare(result))
        click.echo(f"grids: {', '.join(result['grids'].values())}  ({result['seconds']:.0f} s in all)")
        if as_json:
            click.echo(json.dumps(summary(result)))
        return
    result = run_demo(
        out, seed=seed, seeds=seeds, overwrite=overwrite, progress=not as_json, log=click.echo, model_kind=model_kind
    )
    click.echo(format_table(result))
    click.echo(f"grid: {result['grid']}  ({result['seconds']:.0f} s in all)")
    if as_json:
        click.echo(json.dumps(demo_summary(result)))
