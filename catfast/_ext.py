"""The one place that imports the compiled extension `catfast._C`. It is imported once; when it is
missing, `EXT_ERROR` keeps the reason (never built, build failed, ABI mismatch) for `catfast.env`."""

from __future__ import annotations

import json
from pathlib import Path

_BUILD_INFO = Path(__file__).with_name("_build_info.json")


def _load():
    import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against: importing _C first fails)

    try:
        from catfast import _C
    except ImportError as e:
        info = build_info()
        if info and not info.get("built"):
            return None, f"not built: {info.get('reason', 'unknown reason')}"
        if info and info.get("built"):
            return None, f"built for torch {info.get('torch')} but failed to load under torch {torch.__version__}: {e}"
        return None, f"not built (no build record; install with `pip install --no-build-isolation .`): {e}"
    return _C, None


def build_info() -> dict | None:
    """What setup.py recorded about the extension build, or None when it left no record."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None


EXT, EXT_ERROR = _load()
