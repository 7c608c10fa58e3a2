"""`catfast eval kps`: the Knowledge Preservation Score of an adapter."""

from __future__ import annotations

import json

import click

from catfast.cli.base import _THREADS_HELP, DEMO_THREADS, _friendly, _set_threads, main


@main.group("eval")
def eval_group() -> None:
    """Evaluate adapters."""


@eval_group.command("kps")
@click.option(
    "--base",
    required=True,
    type=click.Path(),
    help="Base model: a diffusers folder, a single-file SD1.5/SDXL checkpoint (.safetensors), or demo.",
)
@click.option("--base-config", type=click.Path(), help="The diffusers folder that completes a UNet-only --base file.")
@click.option("--adapter", "adapter_file", required=True, type=click.Path(exists=True), help="Adapter file.")
@click.option(
    "--prompts", "prompts_file", required=True, type=click.Path(exists=True), help="Class prompts, one per line."
)
@click.option(
    "--clip",
    "clip_path",
    type=click.Path(exists=True),
    help="Local CLIP model folder. [default on --base demo: the demo's attribute encoder; required otherwise]",
)
@click.option("--trigger", required=True, help="The adapter's trigger word.")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(min=1), help="Seeds per prompt.")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1), help="DDIM steps.")
@click.option("--guidance", default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--references", type=click.Path(exists=True), help="The concept's images (identity is scored on them).")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), help="Also write the images as a PNG grid.")
@click.option("--out-json", type=click.Path(dir_okay=False), help="Write the full result as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the totals as one JSON object.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help=f"{_THREADS_HELP}. [default: 1 on --base demo (a tiny model), one per core otherwise]",
)
@_friendly
def eval_kps_command(
    base, base_config, adapter_file, prompts_file, clip_path, trigger, seeds, steps, guidance, references, grid_path,
    out_json, as_json, threads,
) -> None:  # fmt: skip
    """Knowledge preservation (KPS): base / adapter without trigger / adapter with trigger, in one sampler run.

    Scored with a local CLIP model (--clip), or on --base demo by default with the demo's attribute encoder
    (the classifier `catfast demo` scores with)."""
    from catfast.eval.kps import format_kps_table, run_kps_cli  # lazy: startup
    from catfast.integrations.models import is_demo_base  # lazy: startup

    encoder = None
    if clip_path is None:
        if not is_demo_base(base):
            raise click.UsageError(
                "--clip DIR (a local CLIP model folder) is needed to score this base; only --base demo has a "
                "default encoder (the demo's attribute encoder)"
            )
        from catfast.demo.encoder import load_encoder  # lazy: startup
        from catfast.shipped import check_assets, encoder_path  # lazy: startup

        check_assets()
        encoder = load_encoder(encoder_path())
    _set_threads(threads, DEMO_THREADS if is_demo_base(base) else None)
    result = run_kps_cli(
        base, adapter_file, prompts_file, clip_path, trigger, seeds, steps, out_json, config=base_config,
        references=references, guidance=guidance, grid_path=grid_path, progress=not as_json, encoder=encoder,
    )  # fmt: skip
    click.echo(json.dumps(result["total"]) if as_json else format_kps_table(result))
