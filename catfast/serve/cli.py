"""`catfast serve`: the serving engine behind the HTTP API and playground (``catfast.serve.http``).

With no ``--base`` it serves the shipped demo model with the shipped demo adapters: works on a fresh
install, CPU only, no download.
"""

from __future__ import annotations

import ipaddress
import os

import click

from catfast.errors import CatfastError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(
    base: str = "demo",
    adapters: str | None = None,
    *,
    api_key: str | None = None,
    device: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_resident: int = 16,
    timeout: float = 300.0,
    base_config: str | None = None,
    max_steps: int = 150,
):
    """(engine, app) for the options of ``catfast serve``; the engine is started. ``base_config``: the
    diffusers folder that completes a UNet-only ``base`` file."""
    from catfast.serve.engine import Engine, default_adapters_dir  # lazy: startup
    from catfast.serve.http import create_app  # lazy: startup

    adapters = default_adapters_dir(base, adapters)
    if adapters is not None and not os.path.isdir(adapters):
        raise CatfastError(f"{adapters}: --adapters must be an existing folder of .safetensors files")
    model = base
    if base_config is not None:  # a UNet-only file and the folder of the rest (a whole checkpoint needs none)
        from catfast.integrations.models import resolve_base  # lazy: startup

        model = resolve_base(base, config=base_config)
    engine = Engine(
        model,
        adapters_dir=adapters,
        device=device,
        max_batch=max_batch,
        max_queue=max_queue,
        max_resident=max_resident,
        timeout_s=timeout,
        max_steps=max_steps,
    )
    engine.start()
    demo_names = {"demo": "catfast-demo", "demo-dit": "catfast-demo-dit"}
    name = demo_names.get(base) or os.path.basename(os.path.normpath(base))
    return engine, create_app(engine, api_key=api_key, adapters_dir=adapters, model_name=name)


@click.command("serve")
@click.option(
    "--base",
    default="demo",
    show_default=True,
    help="Base model: a diffusers folder (a UNet model, or a FLUX.1 / SD3 / Qwen-Image pipeline), a single-file "
    "SD1.5/SDXL checkpoint (.safetensors), 'demo' (the shipped model) or 'demo-dit' (the shipped Flux-style model, "
    "32 px; with its three shipped adapters).",
)
@click.option(
    "--model",
    "demo_model",
    type=click.Choice(["unet", "dit"]),
    default=None,
    help="The shipped demo model to serve, as `catfast demo --model`: unet = --base demo, dit = --base demo-dit.",
)
@click.option("--base-config", default=None, help="The diffusers folder that completes a UNet-only --base file.")
@click.option(
    "--adapters",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of adapters: each *.safetensors is registered by its stem, and POST /v1/adapters reads only "
    "from it. Default: the shipped demo adapters with --base demo or demo-dit, none otherwise.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="CATFAST_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1 and /metrics (or set CATFAST_API_KEY).",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Images per denoiser call.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1), help="Waiting requests.")
@click.option("--max-resident", default=16, show_default=True, type=click.IntRange(min=1), help="Adapters on device.")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1), help="Seconds per request.")
@click.option(
    "--max-steps",
    default=150,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Most denoising steps a request may ask for.",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(**options) -> None:
    """Serve BASE and its adapters: OpenAI-compatible /v1/images/generations, /v1/adapters, /health,
    /metrics and a web playground at /. Without --base: the shipped demo model and adapters."""
    try:
        _serve(**options)
    except CatfastError as e:  # one line, no traceback (as catfast.cli's commands)
        raise click.ClickException(str(e)) from None


def _serve(*, host, port, api_key, log_level, demo_model, **engine_options):
    """``catfast serve`` with its options; ``engine_options`` are ``build_app``'s (base, adapters, ...)."""
    from catfast.serve.http import run  # lazy: startup

    if demo_model is not None:
        if engine_options["base"] != "demo":
            raise CatfastError(f"--model {demo_model} picks a shipped demo model; leave out --base, or --model")
        engine_options["base"] = {"unet": "demo", "dit": "demo-dit"}[demo_model]

    if api_key is not None and not api_key.strip():
        raise CatfastError("--api-key must not be empty")
    if api_key is None and not _is_loopback(host):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    engine, app = build_app(api_key=api_key, **engine_options)
    names = ", ".join(a.name for a in engine.adapters()) or "none"
    click.echo(f"catfast serve: {engine_options['base']} with adapters {names}; playground at http://{host}:{port}/")
    try:
        run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
