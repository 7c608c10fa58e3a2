"""Write outputs atomically, so a crash or a failed check never leaves a half-written file or folder:
``write_atomic`` for one file; for a whole folder, refuse a non-empty target unless asked to
overwrite, build the new folder beside it under a temporary name, and swap it into place only when
complete.

Interrupted runs: while a staging folder exists, SIGTERM (what ``kill``, systemd, ``docker stop`` and job
schedulers send) ends the run the way Ctrl-C does (``sigterm_as_interrupt``), so the folder is removed.
Only SIGKILL or a power cut leaves one behind; each staging folder carries a marker file
(``STAGING_MARKER``: its target, process id and host), and the next run for the same target removes the
ones whose process is gone (``remove_stale_staging``) and says so. A folder without the marker is left
alone: nothing proves it is catfast's."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("catfast")
STAGING_MARKER = ".catfast-staging.json"

# Image files catfast reads (training data, KPS reference images), by suffix, compared lower-case.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_target(out: Path, overwrite: bool, error: type[Exception]) -> None:
    """Before any work: raise ``error`` when the output folder ``out`` is a symbolic link (never written
    through), a file, or a non-empty folder and not ``overwrite``, or when its parent folder (where
    `staged_folder` builds it) cannot be created or written."""
    out = Path(out)
    if out.is_symlink():
        raise error(f"{out}: is a symbolic link; catfast does not write through links: give the real folder")
    if out.exists() and not out.is_dir():
        raise error(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")
    ensure_writable_folder(out.absolute().parent, error)


def check_output_file(path: str | os.PathLike, overwrite: bool, error: type[Exception]) -> Path:
    """Before any work: raise ``error`` when the output file ``path`` is a symbolic link (never written
    through), a folder, or an existing file and not ``overwrite``, or when its folder cannot be created
    or written. Returns ``path`` as a Path."""
    path = Path(path)
    if path.is_symlink():
        raise error(f"{path}: is a symbolic link; catfast does not write through links: give a real file name")
    if path.is_dir():
        raise error(f"{path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise error(f"{path}: exists (pass --overwrite to replace it)")
    ensure_writable_folder(path.absolute().parent, error)
    return path


@contextlib.contextmanager
def staged_folder(out: Path, say: Callable[[str], None] | None = None):
    """Yield an empty temporary folder beside ``out``; when the block ends without an exception, it
    replaces ``out`` (the old folder is removed only after the rename). The temporary folder is removed
    in every case, SIGTERM included (``sigterm_as_interrupt``). Stale staging folders of ``out`` left by
    a killed run are removed first (``remove_stale_staging``; ``say`` gets one line for each, default: a
    logged warning). The temporary folder holds ``STAGING_MARKER`` until it is renamed; then the marker
    is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent, f".{out.name}.partial-", say)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        mark_staging(tmp, out.name)
        with sigterm_as_interrupt():
            yield tmp
        (tmp / STAGING_MARKER).unlink()
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def mark_staging(folder: Path, target: str) -> None:
    """Write ``STAGING_MARKER`` into a new staging folder: what it is for (``target``), the process that
    writes it and its host, so that a later run can prove the folder stale (``remove_stale_staging``)."""
    record = {"target": target, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    (folder / STAGING_MARKER).write_text(json.dumps(record))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(parent: Path, prefix: str, say: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the folders ``parent/<prefix>*`` that a killed run left: those whose ``STAGING_MARKER``
    names this host and a process that no longer runs. ``say`` (default: a logged warning) gets one line
    per folder removed, and per folder left because nothing proves it stale (no marker, or its process is
    still running). Returns the folders removed."""
    say = say or log.warning
    removed = []
    for path in sorted(parent.glob(f"{prefix}*")) if parent.is_dir() else []:
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            record = json.loads((path / STAGING_MARKER).read_text())
            pid, host, started = int(record["pid"]), str(record["host"]), float(record["started"])
        except (OSError, ValueError, KeyError, TypeError):
            say(f"left {path} in place: it has no readable {STAGING_MARKER}, so nothing proves it stale")
            continue
        if pid == os.getpid():
            continue  # this process's own, in use
        if host != socket.gethostname() or _alive(pid):
            say(f"left {path} in place: its run (process {pid} on {host}) may still be writing it")
            continue
        shutil.rmtree(path, ignore_errors=True)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        say(f"removed {path}: the staging folder of an interrupted run (process {pid}, started {when})")
        removed.append(path)
    return removed


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does, so ``finally``
    blocks (a staging folder's removal) run; the previous handler is restored after. Does nothing outside
    the main thread, or when another SIGTERM handler than the default one is installed (a server's own)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def ensure_writable_folder(out: Path, error: type[Exception]) -> None:
    """Create ``out`` if missing and check a file can be written in it; ``error`` names the folder and
    the OS's reason otherwise (before any long work starts)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise error(f"{out}: cannot write to this folder ({e.strerror or e}); choose another output folder") from None


def _umask() -> int:
    """The process umask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, os.replace, then fsync the
    folder: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
