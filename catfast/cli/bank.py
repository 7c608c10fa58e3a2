"""`catfast bank make`: sample a knowledge bank from a base model once (``catfast.train.bank``), for
`catfast train --bank DIR`."""

from __future__ import annotations

import click

from catfast.cli.base import _friendly, _set_threads, main


@main.group("bank")
def bank() -> None:
    """Knowledge banks: base-model samples replayed in training (Diff-Tuning; docs/retention.md)."""


@bank.command("make")
@click.option(
    "--base",
    required=True,
    help="Base model: a diffusers folder, a hub id, a single-file SD1.x/SDXL checkpoint, or demo.",
)
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False), help="Prompts, one a line.")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Samples (row i: prompt i mod len, seed S+i).")
@click.option("--out", required=True, type=click.Path(), help="The bank folder to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of the first sample.")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1), help="DDIM steps.")
@click.option("--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance scale.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1), help="Samples per sampler run.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch. [default: one per core]")
@click.option("--overwrite", is_flag=True, help="Replace a bank already in --out.")
@_friendly
def bank_make(base, prompts_file, n, out, seed, steps, guidance, batch, threads, overwrite) -> None:
    """Sample N latents from BASE on the prompts of --prompts and write them, with their prompt, seed and
    the base model's identity, to --out."""
    from catfast.folders import check_target
    from catfast.integrations.models import resolve_base  # lazy: startup
    from catfast.train.bank import BankError, make_bank, read_prompts  # lazy: startup

    prompts = read_prompts(prompts_file, "--prompts file")
    check_target(out, overwrite, BankError)  # before the model loads
    _set_threads(threads, None)
    model = resolve_base(base)
    folder = make_bank(
        model, prompts, n, out, seed=seed, steps=steps, guidance=guidance, batch=batch, overwrite=overwrite
    )
    click.echo(f"wrote a bank of {n} samples ({len(set(prompts))} prompts) to {folder}")
