"""The `catfast` command group and what every subcommand shares: one-line errors (``_friendly``) and the
CPU thread setting (``_set_threads``). The subcommands live in the sibling modules, one per command group."""

from __future__ import annotations

import functools
import os

import click

from catfast.errors import CatfastError


def _friendly(fn):
    """Turn CatfastError, and an OS error (a disk that fills up mid-run, a folder that vanished), into a
    one-line click error. Output places are checked before any work, so the OS error is a last resort."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CatfastError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="catfast")
def main() -> None:
    """catfast: train (CAT), serve (many adapters, mixed in one batch) and export LoRA adapters for
    Stable-Diffusion UNets.

    Every command that takes a base model accepts `--base demo`, the small demo model shipped in the
    package (no download)."""


def _set_threads(threads: int | None, default: int | None, echo=functools.partial(click.echo, err=True)) -> int:
    """Set torch's CPU thread count: ``threads`` when given, else ``default`` (None: torch's own, one per
    core). Prints a note when the machine is already busy (1-minute load average + our threads above
    the core count): then threads spin against other processes, and fewer threads are faster."""
    import torch  # lazy: startup

    n = threads or default or torch.get_num_threads()
    torch.set_num_threads(n)
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return n
    if load + n > cores + 0.5:
        echo(
            f"note: this machine is busy (load {load:.1f} on {cores} cores) and catfast uses {n} thread(s): "
            "expect slower runs than the README's timings (an idle machine); with other work running, "
            "--threads 1 is the most robust choice"
        )
    return n


_THREADS_HELP = "CPU threads for torch"
DEMO_THREADS = 1  # the demo's UNet is tiny: a second thread gains little, and on a busy CPU it spins
DEMO_TIME = "about 2 min on an idle 2-core CPU, 1 thread"  # README states the same; measured in the lead's merge
