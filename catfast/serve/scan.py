"""Which files of the adapters folder the server reads: the one rule that the start-up scan of
``--adapters DIR`` and ``POST /v1/adapters`` share.

A path names a file inside the folder: relative, no ``..``, valid file-system text, a ``.safetensors``
name, after following symbolic links still inside the folder (a link that leaves it, or a loop of links,
is refused), and a regular file when it exists (not a folder, FIFO or device). Each refusal is an
``AdapterPathError`` (HTTP 400) with a one-line message and the OpenAI error code. The start-up scan
applies the same rule to every ``*.safetensors`` entry of the folder, then reads the file with the same
checks as a registration (``AdapterPool.read_file``), and skips what fails with one warning line; a bad
file never stops the server.
"""

from __future__ import annotations

import os
from pathlib import Path

from catfast.serve.errors import AdapterPathError

SUFFIX = ".safetensors"


def one_line(text: str) -> str:
    """``text`` on one line (a warning or an error message must not span lines)."""
    return " ".join(str(text).split())


def adapter_file(folder: Path, rel) -> Path:
    """The file ``rel`` (a path relative to ``folder``) names, resolved; AdapterPathError when the server
    must not read it (module docstring). Whether it exists is left to the reader."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise AdapterPathError(f"path must be a file name inside the adapters folder, got {rel!r}")
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:
        raise AdapterPathError(f"path {rel!r} is not valid file-system text (a lone surrogate)") from None
    if Path(rel).is_absolute() or rel.startswith(("/", "\\", "~")) or ".." in Path(rel).parts:
        raise AdapterPathError(
            f"path {rel!r} leaves the adapters folder: give a name relative to it", "path_outside_adapters"
        )
    try:
        root = Path(folder).resolve()
        full = (root / rel).resolve()
    except RuntimeError:  # Path.resolve: "Symlink loop from ..."
        raise AdapterPathError(f"path {rel!r} is a loop of symbolic links") from None
    except OSError as e:
        raise AdapterPathError(f"path {rel!r} cannot be resolved: {e.strerror or e}") from None
    if not full.is_relative_to(root):
        raise AdapterPathError(
            f"path {rel!r} leaves the adapters folder (it resolves outside it)", "path_outside_adapters"
        )
    if full.suffix != SUFFIX:
        raise AdapterPathError(f"path {rel!r}: adapters are {SUFFIX} files (nothing else is read)")
    if full.exists() and not full.is_file():  # a folder, a FIFO (reading it would block), a device
        raise AdapterPathError(f"path {rel!r} is not a regular file")
    return full


def folder_entries(folder: Path) -> list[str]:
    """The names of the ``*.safetensors`` entries of ``folder`` (files and links of any kind), sorted:
    what the start-up scan registers, each by its stem."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.name.endswith(SUFFIX) and len(e.name) > len(SUFFIX))
