"""`catfast train`: every option of ``TrainConfig`` as a flag, over a config file and ``--set`` pairs."""

from __future__ import annotations

import click
import tomllib

from catfast.cli.base import _THREADS_HELP, _friendly, _set_threads, main
from catfast.train.config import TrainConfig
from catfast.train.recipes import DEMO_RECIPE, DIT_RECIPE, PAPER_RECIPE


def _set_option(ctx, param, values) -> dict:
    """``--set KEY=VALUE`` pairs; VALUE is read as a TOML value (42, 1e-4, true, ["a", "b"]) or a string."""
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def _default(name: str) -> str:
    """`train -h`'s default of option ``name``, from TrainConfig, in click's own "[default: X]" form (rank,
    lr, batch size and steps: the CAT paper's, and the demo's recipe on --base demo; --base names the DiT recipe)."""
    if name in PAPER_RECIPE:
        return f"[default: {PAPER_RECIPE[name]:g}; {DEMO_RECIPE[name]:g} on --base demo]"
    value = getattr(TrainConfig(), name)
    if value is None or isinstance(value, bool):
        value = "on" if value else "off"
    return f"[default: {value}]"


_REQUIRED = "[required unless set in --config]"
_DIT_DEFAULTS = ", ".join(f"{k.replace('_size', '')} {v:g}" for k, v in DIT_RECIPE.items())


@main.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML, YAML or JSON file of options.")
@click.option(
    "--base",
    help="Base model: a diffusers folder, a hub id (owner/name), a single-file SD1.x/SDXL checkpoint "
    f"(.safetensors, A1111/civitai layout), a UNet-only file with --base-config, or demo (the shipped demo model). "
    "A DiT base, a diffusers FluxPipeline / StableDiffusion3Pipeline / QwenImagePipeline folder, trains the "
    "transformer with the flow-matching CAT loss (one adapter, one process; options it lacks are refused), by "
    f"default with {_DIT_DEFAULTS} and the family's LoRA targets. "
    f"{_REQUIRED}",
)
@click.option(
    "--base-config",
    help="A diffusers folder: the rest of a UNet-only --base file, or the configs of a single-file checkpoint "
    "of another shape than SD1.5 / SDXL-base.",
)
@click.option(
    "--data",
    help="Folder of images with .txt captions or a metadata.jsonl, or a kohya-style folder of N_trigger class "
    "subfolders (e.g. '10_sks star': each image 10 times an epoch, caption 'sks star' where no .txt exists, "
    f"one concept per trigger). {_REQUIRED}",
)
@click.option(
    "--trigger",
    help=f"The trigger word every caption contains (kohya folders: read from their names). {_REQUIRED}",
)
@click.option("--out", help=f"Output folder (adapter, metrics, samples, checkpoints). {_REQUIRED}")
@click.option("--steps", type=click.IntRange(min=1), help=f"Optimizer steps. {_default('steps')}")
@click.option("--seed", type=int, help=f"Seed of the LoRA init, data order, noise and timesteps. {_default('seed')}")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    help=f"Steps between checkpoints (the last step is always one); 0: none. {_default('checkpoint_every')}",
)
@click.option(
    "--keep-checkpoints",
    type=click.IntRange(min=0),
    help="How many checkpoints to keep, the newest (each holds a loadable adapter, lora.safetensors, and the "
    "state --resume needs); 0: all. [default: 0]",
)
@click.option(
    "--sample-every",
    type=click.IntRange(min=0),
    help=f"Steps between sample grids (and one at the end); 0: none. {_default('sample_every')}",
)
@click.option(
    "--sample-prompt",
    "sample_prompts",
    multiple=True,
    help="Sample prompt without the trigger (repeatable). [default: the first training caption, stripped]",
)
@click.option("--rank", type=click.IntRange(min=1), help=f"LoRA rank. {_default('rank')}")
@click.option("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha / rank. [default: rank]")
@click.option(
    "--targets",
    help="LoRA target modules: comma-separated name suffixes (e.g. to_q,to_k,to_v,to_out.0) or a preset: "
    "attention (every attention projection, the CAT paper's) or locon (also a UNet's convolutions conv1, conv2, "
    "conv_shortcut and the proj_in/proj_out around its transformer blocks: LoCon-style, for objects and textures "
    "the attention alone does not draw; docs/retention.md). [default: attention; the family's on a DiT]",
)
@click.option("--lr", type=float, help=f"AdamW learning rate. {_default('lr')}")
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine", "linear"]),
    help=f"Learning-rate schedule after warmup (cosine/linear decay to 0 at --steps). {_default('lr_schedule')}",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    help=f"Steps of linear lr warmup from 0. {_default('warmup_steps')}",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help=f"Images per step, per process. {_default('batch_size')}"
)
@click.option(
    "--grad-accum", type=click.IntRange(min=1), help=f"Micro-batches per optimizer step. {_default('grad_accum')}"
)
@click.option(
    "--resolution", type=click.IntRange(min=8), help="Training size in pixels. [default: the model's native size]"
)
@click.option("--allow-upscale", is_flag=True, default=None, help="Accept images smaller than --resolution (enlarged).")
@click.option(
    "--random-flip/--no-random-flip",
    default=None,
    help="Also train on the mirror image of every crop (kohya's --flip_aug). Off for subjects whose mirror image "
    "is another subject: text, logos, diagonal stripes (docs/retention.md). [default: on, as the CAT paper; off on "
    "--base demo, whose objects have diagonal stripes]",
)
@click.option(
    "--cat-weight",
    type=click.FloatRange(min=0),
    help=f"Weight (lambda) of the CAT term; 0: plain LoRA. {_default('cat_weight')}",
)
@click.option(
    "--caption-dropout",
    type=click.FloatRange(min=0, max=1, max_open=True),
    help="Share of concept samples whose diffusion term sees the empty caption (kohya's caption_dropout_rate; the "
    "CAT term keeps the stripped caption): teaches the adapter's unconditional prediction the concept, which "
    f"guidance subtracts (docs/retention.md). {_default('caption_dropout')}",
)
@click.option("--snr-gamma", type=float, help="Min-SNR-gamma loss weighting (e.g. 5). [default: off]")
@click.option(
    "--timesteps",
    type=click.Choice(["uniform", "chain-of-forgetting"]),
    help=f"Training timestep distribution (chain-of-forgetting favours noisy steps). {_default('timesteps')}",
)
@click.option(
    "--cat-prompts",
    help="CAT preservation prompts: stripped (the paper's: the training captions without the trigger), "
    "stripped+empty (also the empty prompt guidance subtracts) or a FILE of extra prompts, one a line "
    f"(docs/retention.md). {_default('cat_prompts')}",
)
@click.option("--bank", help="Knowledge bank folder (`catfast bank make`): replay base-model samples. [default: off]")
@click.option(
    "--bank-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), help=f"{_default('bank_ratio')}"
)
@click.option("--bank-weight", type=click.FloatRange(min=0), help=f"Weight of the bank term. {_default('bank_weight')}")
@click.option(
    "--keep",
    multiple=True,
    callback=lambda ctx, param, values: [p for v in values for p in v.split(",") if p] or None,
    help="Adapters to keep working (frozen, merged, distilled on their recorded trigger prompts): "
    "A.safetensors[,B...] (repeatable). [default: none]",
)
@click.option("--keep-weight", type=click.FloatRange(min=0), help=f"Weight of the keep term. {_default('keep_weight')}")
@click.option(
    "--mixed-precision",
    type=click.Choice(["no", "bf16", "fp16"]),
    help=f"Run the frozen UNet in half precision (LoRA weights stay fp32). {_default('mixed_precision')}",
)
@click.option(
    "--base-dtype",
    type=click.Choice(["auto", "fp8"]),
    help="How the frozen base is stored: auto (the --mixed-precision dtype) or fp8 (a DiT base's frozen Linears "
    "as float8 e4m3 with per-output-channel scales, dequantized in the GEMM: about half of bf16's bytes, what fits "
    f"FLUX.1 in 24 GB). {_default('base_dtype')}",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute UNet activations in backward: less memory, more time. [default: off]",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=None,
    help="Capture each batch shape's whole step (forward, backward, optimizer) as a CUDA graph and replay it: "
    "a batch-1 step is bound by the kernels the host issues. CUDA only; one process, constant lr, no fp16 "
    "loss scaling, one adapter. [default: off]",
)
@click.option("--max-grad-norm", type=float, help=f"Clip the LoRA gradients' norm. {_default('max_grad_norm')}")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["diffusers", "kohya"]),
    help=f"Adapter file format. {_default('format')}",
)
@click.option(
    "--prepend-trigger/--no-prepend-trigger",
    default=None,
    help="Put the trigger before captions that lack it. [default: off]",
)
@click.option(
    "--on-bad-image",
    type=click.Choice(["stop", "skip"]),
    help=f"Unreadable images: stop or skip. {_default('on_bad_image')}",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "fused", "reference", "measure"]),
    help="CAT step implementation; auto picks the faster exact one for the device (on a GPU by timing both over "
    "the first steps; measure: that timing on any device), recorded in metrics.jsonl. "
    f"{_default('mode')}",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    help=f"auto: cuda when torch sees a GPU. {_default('device')}",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help=f"{_THREADS_HELP} (a CPU run; not a result setting). [default: one per core]",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    callback=_set_option,
    metavar="KEY=VALUE",
    help="Any config option (repeatable); a flag given for the same option wins over --set.",
)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--overwrite", is_flag=True, help="Start over in an OUT that holds an earlier run.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def train_command(config_file, settings, resume, overwrite, no_progress, format_, sample_prompts, threads, **flags):
    """Train a CAT LoRA adapter on a folder of captioned images (multi-concept via a config's concepts).

    Every option can also be set in --config or with --set KEY=VALUE. Precedence: a flag, then --set,
    then the config file, then the default (defaults follow the CAT paper; rank, lr, batch size and steps
    follow the base: the demo's recipe on --base demo, the DiT recipe and the family's LoRA targets on a Flux, SD3
    or Qwen-Image pipeline folder). The run prints what it trains with first.

    --data may be a kohya-style folder: subfolders named N_trigger class (e.g. "10_sks star") give each of
    their images N times an epoch, use the folder's "sks star" as the caption of an image without a .txt,
    and make one concept (one adapter) per trigger word; --trigger is then read from the names."""
    from catfast.train.trainer import train  # lazy: startup

    flags.update(format=format_, sample_prompts=list(sample_prompts) or None)
    config = TrainConfig.load(config_file, merge_overrides(settings, flags))
    import torch  # lazy: startup

    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        _set_threads(threads, None)  # a CPU run: threads matter (on a GPU, torch's default is left alone)
    result = train(config, resume=resume, overwrite=overwrite, progress=not no_progress, announce=click.echo)
    if not result.adapters:  # a rank other than 0 under torchrun
        return
    done = result.steps - result.start_step
    from_step = f" (resumed at step {result.start_step})" if result.start_step else ""
    click.echo(f"trained {done} steps{from_step} in {result.seconds:.1f} s ({result.seconds / done:.2f} s per step)")
    for path in dict.fromkeys(result.adapters.values()):
        click.echo(f"wrote adapter to {path}")


def merge_overrides(settings: dict, flags: dict) -> dict:
    """`catfast train`'s overrides of the config file: ``--set`` values, then every flag that was given
    (a flag left out is None and does not hide a ``--set`` of the same option). Keys use underscores."""
    merged = {k.replace("-", "_"): v for k, v in settings.items()}
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged
