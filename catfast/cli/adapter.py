"""`catfast adapter info|convert`: inspect and convert LoRA adapter files."""

from __future__ import annotations

import json

import click

from catfast.cli.base import _friendly, main
from catfast.errors import CatfastError


@main.group()
def adapter() -> None:
    """Inspect and convert LoRA adapter files (diffusers and kohya safetensors)."""


@adapter.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_friendly
def adapter_info(file: str, as_json: bool) -> None:
    """Format, rank per layer, alpha, targets and parameter count of FILE."""
    from catfast.adapters.formats import read_adapter  # lazy: startup

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
    from catfast.adapters.formats import read_adapter, write_adapter  # lazy: startup
    from catfast.folders import check_output_file  # lazy: startup

    check_output_file(dst, overwrite, CatfastError)  # before reading: a bad DST fails at once
    adapter_obj = read_adapter(src)
    write_adapter(adapter_obj, dst, format=to_format, overwrite=overwrite)
    click.echo(f"wrote {to_format} adapter ({len(adapter_obj.layers)} layers) to {dst}")
