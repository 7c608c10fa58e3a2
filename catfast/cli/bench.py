"""`catfast bench train-step|dit-step|onnx|serve|ops`: against the baseline, one process, interleaved
(``catfast.bench``)."""

from __future__ import annotations

import json

import click

from catfast.cli.base import _friendly, main
from catfast.targets import ATTENTION_PROJECTIONS

DIT_MODELS = ("tiny-flux", "tiny-sd3", "tiny-qwenimage", "flux-narrow")  # catfast.bench.dit_step.MODELS


@main.group()
def bench() -> None:
    """Benchmarks run in one process against the baseline, interleaved."""


@bench.command("onnx")
@click.option("--model", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "sd15"]))
@click.option("--reps", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_onnx_command(model, reps, batch, rank, as_json) -> None:
    """UNet latency in ONNX Runtime (each provider that starts here; merged and adapter inputs) against
    PyTorch with the same merged weights."""
    from catfast.bench.onnx import bench_onnx  # lazy: startup

    result = bench_onnx(model, reps=reps, batch=batch, rank=rank, log=(lambda s: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{model} UNet, batch {batch}, {result['device']}, median of {reps}:")
    for name, ms in result["median_ms"].items():
        click.echo(f"  {name:<45} {ms:9.2f} ms")


@bench.command("train-step")
@click.option(
    "--model",
    default="tiny",
    show_default=True,
    type=click.Choice(["tiny", "small", "sd15-skeleton", "sd15-narrow", "sd15", "sdxl", *DIT_MODELS]),
    help="A DiT model runs `bench dit-step` (its own contestants: plain LoRA and ai-toolkit's DOP).",
)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Timed steps per entry.")
@click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option(
    "--targets",
    default=",".join(ATTENTION_PROJECTIONS),  # the CAT paper's targets
    show_default=True,
    help="LoRA target modules, comma-separated (add conv1,conv2,conv,conv_shortcut for kohya LoCon).",
)
@click.option(
    "--against",
    default="official,ai-toolkit,kohya",
    show_default=True,
    help="Today's CAT / preservation steps to time against, comma-separated (empty: none).",
)
@click.option(
    "--mixed-precision",
    default="no",
    show_default=True,
    type=click.Choice(["no", "bf16", "auto"]),
    help="bf16 autocast for every entry (auto: where the device has bf16 and a bf16 GEMM is 1.2x an fp32 one).",
)
@click.option("--memory/--no-memory", default=True, show_default=True, help="Peak RSS, one process per entry (CPU).")
@click.option(
    "--compile/--no-compile",
    "compile_reference",
    default=False,
    show_default=True,
    help="Also time the reference step through torch.compile (minutes of compiling at SD1.5 size).",
)
@click.option(
    "--layouts", is_flag=True, help="Also time the fused step in each layout (fused:one-call, fused:teacher-first)."
)
@click.option(
    "--graphs", is_flag=True, help="Also time the fused step replayed as a CUDA graph (fused:graphed; CUDA only)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_train_step_command(
    model, batch, steps, rank, dtype, targets, against, mixed_precision, memory, compile_reference, layouts, graphs,
    as_json,
):  # fmt: skip
    """catfast's CAT step modes against today's CAT steps (official CAT, ai-toolkit and kohya DOP),
    interleaved in one process: time, FLOPs and their share of the GEMM rate, memory, parity."""
    from catfast.bench.contestants import check_names  # lazy: startup
    from catfast.bench.train_step import bench_train_step  # lazy: startup

    if model in DIT_MODELS:
        if dtype != "fp32" or mixed_precision != "no" or compile_reference or layouts or graphs:
            raise click.UsageError(f"--model {model}: the DiT step is measured in fp32 eager (no --dtype, "
                                   "--mixed-precision, --compile, --layouts or --graphs)")  # fmt: skip
        from catfast.bench.dit_step import bench_dit_step  # lazy: startup

        _echo_dit(bench_dit_step(model, batch=batch, steps=steps, rank=rank), as_json)
        return
    result = bench_train_step(
        model,
        batch,
        steps,
        rank=rank,
        dtype=dtype,
        targets=targets.split(","),
        against=check_names(against.split(",")),
        mixed_precision=mixed_precision,
        memory=memory,
        compile_reference=compile_reference,
        layouts=layouts,
        graphs=graphs,
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"{model} UNet, batch {batch}, {dtype} ({result['mixed_precision_reason']}), {result['device']}, "
        f"median of {steps} steps; GEMM rate {result['gemm_flops'] / 1e9:.1f} GFLOP/s"
    )
    for section in ("modes", "against"):
        for name, m in result[section].items():
            flops = f"{m['achieved_flops'] / 1e9:6.1f} GFLOP/s ({m['gemm_fraction']:.0%} of GEMM)"
            peak = f"peak {m['peak_bytes'] / 2**20:7.0f} MiB" if m["peak_bytes"] else ""
            parity = f"loss/grad rel err {m['loss_rel_err']:.0e}/{m['grad_rel_err']:.0e}" if "loss_rel_err" in m else ""
            click.echo(
                f"  {name:<20} {m['median_ms']:10.1f} ms (cpu {m['median_cpu_ms']:.0f} ms)  {flops}  "
                f"launching ops {m['launch_ops']}  host syncs {m['host_syncs']}  "
                f"params {m['param_bytes'] / 2**20:6.0f} MiB  "
                f"{peak}  {parity}"
            )
    click.echo(f"  auto -> {result['auto']['mode']}: {result['auto']['reason']}")
    for name, ratio in result["default_vs"].items():
        click.echo(f"  catfast's default step is {ratio:.2f}x the {name} step's speed")
    for name, r in result.get("launch_vs_official", {}).items():
        click.echo(f"  {name} issues {r['launch_ops']:.2f}x the official step's launching ops in {r['host_ms']:.2f}x "
                   "its host time")  # fmt: skip


@bench.command("dit-step")
@click.option(
    "--model",
    default="tiny-flux",
    show_default=True,
    type=click.Choice(DIT_MODELS),
    help="flux-narrow: one double and one single FLUX.1 block at FLUX.1's widths (about 2 GB in fp32).",
)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Timed steps per mode.")
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--side", default=16, show_default=True, type=click.IntRange(min=2), help="Latent pixels per side.")
@click.option("--tokens", default=32, show_default=True, type=click.IntRange(min=1), help="Text tokens per caption.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_dit_step_command(model, batch, steps, rank, side, tokens, as_json) -> None:
    """The flow-matching CAT step on a diffusion transformer: fused (one call) against reference (three calls),
    interleaved in one process: launching ops, host syncs, time, parity."""
    from catfast.bench.dit_step import bench_dit_step  # lazy: startup

    if side % 2:
        raise click.BadParameter("the transformers patch 2x2 latent pixels: give an even --side", param_hint="--side")
    _echo_dit(bench_dit_step(model, batch=batch, steps=steps, rank=rank, side=side, tokens=tokens), as_json)


def _echo_dit(result: dict, as_json: bool) -> None:
    """Print ``bench_dit_step``'s result: one JSON object, or a table."""
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['model']} ({result['family']}), batch {result['batch']}, rank {result['rank']}, "
               f"{result['latent_side']}x{result['latent_side']} latents, {result['text_tokens']} text tokens, "
               f"{result['threads']} threads, median of {result['steps']} steps:")  # fmt: skip
    for name, m in result["entries"].items():
        parity = f"  loss/grad rel err {m['loss_rel_err']:.0e}/{m['grad_rel_err']:.0e}" if "loss_rel_err" in m else ""
        click.echo(f"  {name:<20} {m['median_ms']:9.1f} ms (cpu {m['median_cpu_ms']:.0f} ms)  launching ops "
                   f"{m['launch_ops']}  host syncs {m['host_syncs']}  saved {m['saved_bytes'] / 2**20:.1f} MiB"
                   f"{parity}")  # fmt: skip
    r = result["fused_vs_reference"]
    click.echo(f"  fused: {r['launch_ops']:.2f}x the reference's launching ops, {r['speed']:.2f}x its speed")
    for name, x in result["time_vs_plain"].items():
        click.echo(f"  {name} takes {x:.2f}x a plain LoRA step's time")


@bench.command("ops")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]), help="Default: cuda when present.")
@click.option("--dtypes", default="fp32,bf16", show_default=True, help="Comma-separated: fp32, bf16, fp16.")
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1), help="Interleaved rounds.")
@click.option("--smoke", is_flag=True, help="Tiny shapes (seconds; the test suite runs this).")
@click.option(
    "--tune",
    "tune_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Instead: time the Triton kernels' tile candidates on this CUDA GPU and write the fastest into this "
    "tile table (CATFAST_TILES=PATH reads it; catfast/kernels/tiles.json is the shipped one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_ops_command(device, dtypes, reps, smoke, tune_path, as_json) -> None:
    """Each native op (merge and swap, GroupNorm+SiLU, the CAT loss, the LoRA GEMM) against torch, and Triton
    where it exists, interleaved in one process: GB/s, ms, and FLOP/s against the plain GEMM."""
    if tune_path is not None:
        from catfast.bench.tiles import tune_and_write  # lazy: startup

        entry = tune_and_write(tune_path, echo=(lambda s: None) if as_json else click.echo)
        click.echo(json.dumps(entry) if as_json else f"wrote {tune_path}")
        return
    from catfast.bench.ops import DTYPES, bench_ops  # lazy: startup

    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    if not names or any(d not in DTYPES for d in names):
        raise click.BadParameter(f"--dtypes must be a comma-separated subset of {', '.join(DTYPES)}, got {dtypes!r}")
    result = bench_ops(
        device=device, smoke=smoke, reps=reps, dtypes=names, log=(lambda s: None) if as_json else click.echo
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['device']}, {result['threads']} thread(s), torch {result['torch']}, median of {reps} rounds")


SERVE_DIT_MODELS = ("tiny-flux", "tiny-sd3", "tiny-qwenimage")  # catfast.bench.serve_dit.MODELS
UNET_ONLY = ("registered", "requests", "adapters", "max_batch", "diffusers_max")  # serve options a DiT run refuses
DIT_ONLY = ("resident", "size")


@bench.command("serve")
@click.option(
    "--model",
    default="tiny",
    show_default=True,
    type=click.Choice(["tiny", "small", "sd15", *SERVE_DIT_MODELS]),
    help="A DiT pipeline serves through catfast.serve.dit (catfast/bench/serve_dit.py: switch, mixed sampler "
    "runs, launching ops; no diffusers or throughput phase).",
)
@click.option(
    "--resident",
    default=None,
    help="DiT models: adapters resident for the switch. [default: 1,16,256; 1,16,256,1024 with --full]",
)
@click.option(
    "--size", default=None, type=click.IntRange(min=2), help="DiT models: image side in pixels. [default: 32]"
)
@click.option("--registered", default="1,64,1024", show_default=True, help="Adapter counts registered for the switch.")
@click.option("--mixed", default="1,4,16", show_default=True, help="Distinct adapters in the one-step batch.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1), help="Rows of the one-step batch.")
@click.option("--requests", type=click.IntRange(min=1), help="Throughput requests. [default: 32; 64 with --full]")
@click.option("--adapters", default=16, show_default=True, type=click.IntRange(min=1), help="Throughput adapters.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Denoising steps per request.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1), help="Engine's max batch.")
@click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--diffusers-max", type=click.IntRange(min=0),
              help="At most this many adapters loaded into the diffusers baseline (loading is slow). "
              "[default: 16; 1024 with --full]")  # fmt: skip
@click.option(
    "--full",
    is_flag=True,
    help="The whole sweep: diffusers with up to 1024 adapters loaded and 64 requests (it ran past 20 min on "
    "a 2-core CPU; the defaults take a few minutes). DiT models: 1024 resident adapters too.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def bench_serve_command(
    model, resident, size, registered, mixed, batch, requests, adapters, steps, max_batch, rank, reps, diffusers_max,
    full, as_json,
) -> None:  # fmt: skip
    """The serving engine against diffusers on the same model, interleaved: adapter switch latency, one
    step with N distinct adapters in the batch, and throughput of mixed-adapter requests. A progress line
    starts each phase (on stderr with --json)."""

    def counts(text: str, what: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise click.BadParameter(f"{what} must be positive integers, got {text!r}")
        return values

    ctx = click.get_current_context()
    given = lambda names: [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]  # noqa: E731
    dit = model in SERVE_DIT_MODELS
    wrong = given(UNET_ONLY if dit else DIT_ONLY)
    if wrong:
        what = "a DiT model" if dit else "a UNet model"
        raise click.UsageError(f"--model {model}: {', '.join('--' + n.replace('_', '-') for n in wrong)} do not "
                               f"apply to {what}")  # fmt: skip
    if dit:
        from catfast.bench.serve_dit import FULL as DIT_FULL  # lazy: startup
        from catfast.bench.serve_dit import QUICK as DIT_QUICK
        from catfast.bench.serve_dit import bench_serve_dit

        preset = DIT_FULL if full else DIT_QUICK
        result = bench_serve_dit(
            model,
            resident=preset["resident"] if resident is None else counts(resident, "--resident"),
            mixed=counts(mixed, "--mixed"),
            batch=batch,
            steps=steps,
            size=32 if size is None else size,
            rank=rank,
            reps=reps,
            log=(lambda s: click.echo(s, err=True)) if as_json else click.echo,
        )
        _echo_serve_dit(result, as_json)
        return
    from catfast.bench.serve import FULL, QUICK, bench_serve  # lazy: startup

    preset = FULL if full else QUICK
    requests = preset["requests"] if requests is None else requests
    diffusers_max = preset["diffusers_max"] if diffusers_max is None else diffusers_max
    result = bench_serve(
        model,
        registered=counts(registered, "--registered"),
        mixed=counts(mixed, "--mixed"),
        batch=batch,
        requests=requests,
        adapters=adapters,
        steps=steps,
        max_batch=max_batch,
        rank=rank,
        reps=reps,
        diffusers_max=diffusers_max,
        log=(lambda s: click.echo(s, err=True)) if as_json else click.echo,  # partial results as they come
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    sw, mx, tp = result["switch_ms"], result["mixed"], result["throughput"]
    click.echo(f"{model}, {result['device']}, {result['threads']} thread(s), median of {reps}:")
    for count in sw["resident"]:
        click.echo(
            f"  switch, {count:>5} registered: resident {sw['resident'][count]:.3f} ms, cold host "
            f"{sw['cold_host'][count]:.2f} ms, cold disk {sw['cold_disk'][count]:.1f} ms; diffusers set_adapters "
            f"{sw['diffusers_set_adapters'].get(count, float('nan')):.2f} ms, fuse "
            f"{sw['diffusers_fuse'].get(count, float('nan')):.1f} ms"
        )
    click.echo(f"  one step, {mx['rows']} rows: " + ", ".join(f"{k} {v:.1f} ms" for k, v in mx["median_ms"].items()))
    click.echo(f"  ratio 16/1: {mx.get('ratio_16')}, unmerged/merged {mx['unmerged_vs_merged']}")
    click.echo(
        f"  throughput: {tp['engine_images_per_s']} images/s vs diffusers {tp['diffusers_images_per_s']} "
        f"({tp['vs_diffusers']}x)"
    )


def _echo_serve_dit(result: dict, as_json: bool) -> None:
    """Print ``bench_serve_dit``'s result: one JSON object, or a table."""
    if as_json:
        click.echo(json.dumps(result))
        return
    sw, mx, lo = result["switch_ms"], result["mixed"], result["launch_ops"]
    click.echo(f"{result['model']}, {result['device']}, {result['threads']} thread(s), "
               f"median of {result['settings']['reps']}:")  # fmt: skip
    for count in sw["resident"]:
        click.echo(f"  switch, {count:>5} resident: {sw['resident'][count]:.3f} ms (pool {sw['pool'][count]:.3f} ms), "
                   f"cold host {sw['cold_host'][count]:.1f} ms, cold disk {sw['cold_disk'][count]:.1f} ms; a 1-row "
                   f"2-step run {sw['run_ms'][count]:.1f} ms")  # fmt: skip
    click.echo(f"  sampler run, {mx['rows']} rows, {mx['steps']} steps, {mx['size']} px: "
               + ", ".join(f"{k} {v:.1f} ms" for k, v in mx["median_ms"].items()))  # fmt: skip
    click.echo(f"  ratio 16/1: {mx.get('ratio_16')}, unmerged/merged {mx['unmerged_vs_merged']} "
               f"(one resident: {mx['one_resident_vs_merged']}); mixed row vs alone rel err "
               f"{mx['max_rel_err_vs_alone']:.1e}")  # fmt: skip
    click.echo(f"  launching ops of one step, 1 row: unmerged {lo['unmerged']}, merged {lo['merged']} ({lo['ratio']}x)")
