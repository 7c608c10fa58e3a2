"""Where the shipped demo files are, and a check that they are complete and undamaged.

catfast/demo/assets/ holds the pretrained demo model (model/, a diffusers folder that ``load_base``
reads), the attribute encoder (encoder.safetensors) and MANIFEST.json: the size and sha256 of every
file, written when the assets are built (``write_manifest``) and checked before the demo uses them
(catfast/e4t/assets/ is checked the same way). A foundation module, not part of ``catfast.demo``:
``--base demo`` is resolved in integrations/models.py, below the demo package, and needs only this.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from catfast.errors import CatfastError

ASSETS = Path(__file__).parent / "demo" / "assets"
MANIFEST = "MANIFEST.json"


def model_path(root: str | os.PathLike | None = None) -> Path:
    return Path(root or ASSETS) / "model"


def dit_model_path(root: str | os.PathLike | None = None) -> Path:
    """The demo's Flux-style DiT base (a FluxPipeline folder; catfast/demo/dit_pretrain.py made it)."""
    return Path(root or ASSETS) / "dit_model"


def dit_adapters_path(root: str | os.PathLike | None = None) -> Path:
    """The DiT demo base's shipped adapters (catfast/demo/dit_adapters.py made them)."""
    return Path(root or ASSETS) / "dit_adapters"


DIT_DEMO_SIDE = 32  # pixels: the DiT demo base's native size (a FluxPipeline folder does not record one)


def encoder_path(root: str | os.PathLike | None = None) -> Path:
    return Path(root or ASSETS) / "encoder.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(root: str | os.PathLike | None = None) -> Path:
    """Record size and sha256 of every file under ``root`` (default: the shipped assets) in
    root/MANIFEST.json."""
    root = Path(root or ASSETS)
    entries = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    path = root / MANIFEST
    path.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return path


def check_assets(root: str | os.PathLike | None = None) -> None:
    """Raise CatfastError naming the first shipped file (under ``root``, default the shipped assets) that
    is missing, truncated or changed."""
    root = Path(root or ASSETS)
    manifest = root / MANIFEST
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise CatfastError(
            f"{manifest}: the demo model's manifest is missing or unreadable ({e}); reinstall catfast"
        ) from None
    for name, entry in entries.items():
        path = root / name
        if not path.is_file():
            raise CatfastError(f"{path}: a file of the shipped demo model is missing; reinstall catfast")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CatfastError(
                f"{path}: damaged file of the shipped demo model ({size} bytes, expected {entry['bytes']}; "
                "truncated?); reinstall catfast"
            )
        if _sha256(path) != entry["sha256"]:
            raise CatfastError(f"{path}: damaged file of the shipped demo model (checksum mismatch); reinstall catfast")
