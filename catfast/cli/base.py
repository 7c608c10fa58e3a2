"""The `catfast` command group and what every subcommand shares: one-line errors (``_friendly``) and the
CPU thread setting (``_set_threads``). The subcommands live in the sibling modules, one per command group."""

from __future__ import annotations

import functools
import os

import click

from catfast.errors import CatfastError


def _friendly(fn):
    """Turn CatfastError, and an OS error (a disk that fills up mid-run, a folder that vanished), into a
    one-line click error. Output places are checked before any work, so the OS error is a last resort.
    A busy-machine note (``_set_threads``) still pending is printed when the command ends, unless it ends
    in bad input (the note is about speed; the error is what the user needs then)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except CatfastError as e:
            _PENDING.clear()
            raise click.ClickException(str(e)) from None
        except OSError as e:
            _PENDING.clear()
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        busy_note_now()
        return result

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="catfast")
def main() -> None:
    """catfast: train (CAT), serve (many adapters, mixed in one batch) and export LoRA adapters for
    Stable-Diffusion UNets; train CAT LoRAs on diffusion transformers too (FLUX.1, SD3, Qwen-Image pipeline
    folders as --base of `catfast train`).

    Every command that takes a base model accepts `--base demo`, the small demo model shipped in the
    package (no download)."""
    quiet_libraries()


# What diffusers, transformers and peft print that says nothing to a catfast user: that transformers'
# image processors fall back to PIL without torchvision (catfast never uses them for the UNet), that a
# LoRA file has no text-encoder keys (catfast's adapters are UNet-only), that peft found a second adapter
# (catfast attaches several on purpose) or had nothing to unmerge. Errors still raise; a user who wants
# the libraries' warnings sets TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY to "warning".
_SILENT_WARNINGS = ("Already found a `peft_config`", "Already unmerged", "`torch_dtype` is deprecated")


def quiet_libraries() -> None:
    """Lower diffusers' and transformers' log level to errors (unless the environment sets it) and ignore
    ``_SILENT_WARNINGS``; imports neither library (their loggers read the variables when imported)."""
    import warnings

    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    for message in _SILENT_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")


_PENDING: list[str] = []  # the busy-machine note of this command, until it is printed (once) or dropped
_SHOWN: list[str] = []


def busy_note(threads: int, load: float | None, cores: int) -> str | None:
    """The note for a CPU run with ``threads`` torch threads on ``cores`` cores at 1-minute load average
    ``load`` (None: unknown), or None. Only a run of more than one thread on a machine whose other work
    already fills the cores gets one: its threads then spin against that work, and ``--threads 1`` is the
    advice that changes something (a 1-thread run has nothing to change)."""
    if threads <= 1 or load is None or load + threads <= cores + 0.5:
        return None
    return (
        f"note: this machine is busy (load {load:.1f} on {cores} cores) and catfast used {threads} threads: "
        "they spin against the other work; --threads 1 is usually faster on a busy machine"
    )


def busy_note_now(echo=functools.partial(click.echo, err=True)) -> None:
    """Print the pending busy-machine note, once per process (a command calls this once its inputs passed
    their checks; ``_friendly`` calls it when the command ends)."""
    while _PENDING:
        note = _PENDING.pop()
        if note not in _SHOWN:
            _SHOWN.append(note)
            echo(note)


def _set_threads(threads: int | None, default: int | None) -> int:
    """Set torch's CPU thread count: ``threads`` when given, else ``default`` (None: torch's own, one per
    core). When the machine is already busy and more than one thread runs (``busy_note``), a note waits
    for ``busy_note_now``: it is not printed before the command's inputs are checked, nor on bad input."""
    import torch  # lazy: startup

    n = threads or default or torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        load = None
    note = busy_note(n, load, os.cpu_count() or 1)
    if note is not None and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
        _PENDING[:] = [note]
    return n


_THREADS_HELP = "CPU threads for torch"
DEMO_THREADS = 1  # the demo's UNet is tiny: a second thread gains little, and on a busy CPU it spins
DEMO_TIME = "about 2 min on an idle 2-core CPU, 1 thread"  # README states the same; measured in the lead's merge
