"""Write outputs atomically, so a crash or a failed check never leaves a half-written file or folder:
``write_atomic`` for one file; for a whole folder, refuse a non-empty target unless asked to
overwrite, build the new folder beside it under a temporary name, and swap it into place only when
complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

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
def staged_folder(out: Path):
    """Yield an empty temporary folder beside ``out``; when the block ends without an exception, it
    replaces ``out`` (the old folder is removed only after the rename). The temporary folder is removed
    in every case."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
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
