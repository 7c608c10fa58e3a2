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
    help="Base model: a diffusers folder (a UNet, or a FLUX.1 / SD3 / Qwen-Image pipeline), a hub id, a single-file "
    "SD1.x/SDXL checkpoint, or demo.",
)
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False), help="Prompts, one a line.")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Samples (row i: prompt i mod len, seed S+i).")
@click.option("--out", required=True, type=click.Path(), help="The bank folder to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of the first sample.")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1), help="Sampler steps (DDIM on a "
              "UNet, the pipeline's flow-matching Euler on a DiT).")  # fmt: skip
@click.option("--guidance", type=float, help="Guidance scale. [default: 7.5 on a UNet, the pipeline's on a DiT]")
@click.option("--size", type=click.IntRange(min=1), help="DiT bases: image side in pixels, the training "
              "resolution. [default: the pipeline's]")  # fmt: skip
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1), help="Samples per sampler run.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch. [default: one per core]")
@click.option("--overwrite", is_flag=True, help="Replace a bank already in --out.")
@_friendly
def bank_make(base, prompts_file, n, out, seed, steps, guidance, size, batch, threads, overwrite) -> None:
    """Sample N latents from BASE on the prompts of --prompts and write them, with their prompt, seed and
    the base model's identity, to --out."""
    from catfast.folders import check_target
    from catfast.integrations.models import resolve_base  # lazy: startup
    from catfast.train.bank import BankError, make_bank, read_prompts  # lazy: startup
    from catfast.train.recipes import dit_family  # lazy: startup

    prompts = read_prompts(prompts_file, "--prompts file")
    check_target(out, overwrite, BankError)  # before the model loads
    _set_threads(threads, None)
    if dit_family(base) is not None:
        from catfast.train.flow_bank import make_flow_bank  # lazy: startup

        folder = make_flow_bank(base, prompts, n, out, seed=seed, steps=steps, guidance=guidance, size=size,
                                batch=batch, overwrite=overwrite)  # fmt: skip
    else:
        if size is not None:
            raise BankError("--size is for DiT bases; a UNet bank is sampled at the UNet's native size")
        model = resolve_base(base)
        guidance = 7.5 if guidance is None else guidance
        folder = make_bank(model, prompts, n, out, seed=seed, steps=steps, guidance=guidance, batch=batch,
                           overwrite=overwrite)  # fmt: skip
    click.echo(f"wrote a bank of {n} samples ({len(set(prompts))} prompts) to {folder}")
