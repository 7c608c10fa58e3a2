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
    """Format, rank per layer, alpha, targets and parameter count of FILE, its trigger words, and the word
    embedding an E4T adapter (`catfast personalize`) carries."""
    from catfast.adapters.formats import read_adapter  # lazy: startup

    adapter_obj = read_adapter(file)
    info = adapter_obj.describe()
    info.update(_carried(file, adapter_obj.metadata))
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(_format_info(file, info))


def _carried(file: str, metadata: dict) -> dict:
    """{"triggers": [...], "embedding": {word, class_word, dims, norm} or None} of an adapter's metadata:
    the trigger words catfast records ("catfast.triggers", or an E4T file's placeholder word) and an E4T
    adapter's word embedding (v*, which `serve`, `export onnx` and the sampler install for the word)."""
    from catfast.integrations.word_embedding import CLASS_KEY, read_embedding  # lazy: startup (torch)

    embedding = read_embedding(metadata, file)
    try:
        triggers = json.loads(metadata.get("catfast.triggers", "[]"))
    except ValueError:
        triggers = []
    triggers = [t for t in triggers if isinstance(t, str)] if isinstance(triggers, list) else []
    if embedding is not None and embedding[0] not in triggers:
        triggers.append(embedding[0])
    if embedding is None:
        return {"triggers": triggers, "embedding": None}
    word, vector = embedding
    shown = {"word": word, "class_word": metadata.get(CLASS_KEY), "dims": int(vector.numel())}
    shown["norm"] = round(float(vector.norm()), 4)
    return {"triggers": triggers, "embedding": shown}


def _family(info: dict) -> str:
    """ " (family flux)" for a transformer adapter; nothing where the component already says it (unet)."""
    family = info.get("family")
    return f" (family {family})" if family and family not in info["components"] else ""


def _format_info(file: str, info: dict) -> str:
    ranks = sorted(set(info["ranks"].values()))
    alphas = sorted(set(info["alphas"].values()))
    lines = [
        f"file:        {file}",
        f"format:      {info['format']} ({info['keys']} keys)",
        f"components:  {', '.join(info['components'])}{_family(info)}",
        f"layers:      {info['num_layers']}",
        f"rank:        {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]} (varies per layer)'}",
        f"alpha:       {alphas[0] if len(alphas) == 1 else f'{alphas[0]}..{alphas[-1]} (varies per layer)'}",
        f"targets:     {', '.join(info['targets'])}",
        f"parameters:  {info['num_parameters']:,}",
        f"triggers:    {', '.join(info['triggers']) if info['triggers'] else '(none recorded)'}",
    ]
    embedding = info.get("embedding")
    if embedding:
        of = f", class word {embedding['class_word']!r}" if embedding["class_word"] else ""
        lines.append(
            f"embedding:   E4T word {embedding['word']!r}: a {embedding['dims']}-d vector "
            f"(norm {embedding['norm']}{of}), installed for that word when the adapter is used"
        )
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
