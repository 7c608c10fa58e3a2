"""`catfast export onnx` and `catfast run-onnx`: ONNX export and the ONNX Runtime runner."""

from __future__ import annotations

from pathlib import Path

import click

from catfast.cli.base import _friendly, main


@main.group("export")
def export_group() -> None:
    """Export a base model with LoRA adapters (ONNX)."""


@export_group.command("onnx")
@click.option(
    "--base",
    required=True,
    type=click.Path(),
    help="Base model: a diffusers folder (read, never written), a single-file SD1.5 checkpoint (.safetensors), "
    "or demo.",
)
@click.option("--base-config", type=click.Path(), help="The diffusers folder that completes a UNet-only --base file.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="[NAME=]FILE[:SCALE]",
    help="LoRA file to apply (repeatable); NAME names it in the export; SCALE multiplies its alpha/r (default 1).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the export to.")
@click.option("--fp16", is_flag=True, help="Export fp16 weights and inputs (validated against fp32 PyTorch).")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (14..20).")
@click.option(
    "--components",
    default=None,
    help="Comma-separated: unet,text_encoder,vae_decoder (UNet base; default unet only, for your own pipeline: "
    "`catfast run-onnx` needs all three); a FLUX.1 / SD3 folder: transformer, its text_encoder(s), vae_decoder "
    "(default: all).",
)
@click.option("--dynamic", is_flag=True, help="UNet: dynamic height/width and text length (batch is always dynamic).")
@click.option(
    "--height", type=int, default=None, help="DiT (FLUX.1 / SD3): pixels to trace at. [default: the pipeline's]"
)
@click.option(
    "--width", type=int, default=None, help="DiT (FLUX.1 / SD3): pixels to trace at. [default: the pipeline's]"
)
@click.option("--max-sequence-length", type=int, default=None, help="DiT: T5 text tokens. [default: the pipeline's]")
@click.option(
    "--adapter-inputs",
    is_flag=True,
    help="One graph whose LoRA A/B are (optional) inputs; per-adapter weights are written next to it.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists and is not empty.")
@_friendly
def export_onnx_command(
    base, base_config, adapters, out, fp16, opset, components, dynamic, height, width, max_sequence_length,
    adapter_inputs, overwrite,
) -> None:  # fmt: skip
    """Merge adapters into a copy of BASE (or make them graph inputs), export to ONNX, check every graph
    with onnx.checker and against PyTorch in ONNX Runtime, and write OUT/manifest.json."""
    from catfast.export.onnx import export_onnx  # lazy: startup

    manifest = export_onnx(
        base,
        out,
        adapters=adapters,
        components=[c.strip() for c in components.split(",") if c.strip()] if components else None,
        fp16=fp16,
        opset=opset,
        dynamic=dynamic,
        adapter_inputs=adapter_inputs,
        overwrite=overwrite,
        log=click.echo,
        base_config=base_config,
        height=height,
        width=width,
        max_sequence_length=max_sequence_length,
    )
    for name, comp in manifest["components"].items():
        v = comp["validation"]
        click.echo(
            f"{name}: {comp['file']} ({comp['bytes'] / 1e6:.1f} MB), max abs err {v['max_abs_err']:.2e}, "
            f"max rel err {v['max_rel_err']:.2e} <= {v['tolerance']:.0e} ({comp['dtype']})"
        )
    if manifest.get("family", "unet") != "unet":
        return
    missing = [c for c in ("unet", "text_encoder", "vae_decoder") if c not in manifest["components"]]
    if missing:
        click.echo(
            f"note: no {', '.join(missing)} in this export, so `catfast run-onnx` cannot run it; for an image "
            "runner export --components unet,text_encoder,vae_decoder"
        )


@main.command("run-onnx")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(),
    help="Folder written by `catfast export onnx --components unet,text_encoder,vae_decoder` (or of a FLUX.1 / "
    "SD3 folder, all components).",
)
@click.option("--prompt", required=True)
@click.option("--adapter", default=None, help="Adapter NAME of an --adapter-inputs export (default: the base).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write (atomically).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--negative-prompt", default=None, help='What the guidance steers away from. [default: "" (SD3: ""; Flux: none)]'
)
@click.option(
    "--steps", default=20, show_default=True, type=click.IntRange(min=1), help="DDIM steps (DiT: flow Euler steps)."
)
@click.option(
    "--guidance-scale",
    default=None,
    type=float,
    help="Classifier-free guidance. [default: 5.0 (serve's); DiT: the pipeline's, Flux 3.5 embedded, SD3 7.0]",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Pixels. [default: the model's native size]")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Pixels. [default: the model's native size]")
@click.option(
    "--provider", default=None, help="ONNX Runtime execution provider. [default: CUDA if it starts, else CPU]"
)
@_friendly
def run_onnx_command(
    model_dir, prompt, adapter, out, overwrite, negative_prompt, steps, guidance_scale, seed, height, width, provider
):
    """Generate an image with ONNX Runtime alone (tokenizer, text encoder, DDIM UNet loop, VAE decoder; a
    FLUX.1 / SD3 export: tokenizers, text encoders, flow-matching Euler loop, VAE decoder)."""
    from catfast.export.runner import run_onnx  # lazy: startup

    if model_dir == "demo" and not Path(model_dir).exists():
        raise click.ClickException(
            "run-onnx runs an ONNX export, and the demo model ships as PyTorch weights: export it first with "
            "`catfast export onnx --base demo --components unet,text_encoder,vae_decoder --out DIR`, then "
            "pass --model DIR"
        )
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
        overwrite=overwrite,
    )
    click.echo(f"wrote {path} ({used}, {steps} steps)")
