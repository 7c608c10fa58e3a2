"""Training checkpoints: written atomically, read back for `--resume`.

A checkpoint is the folder ``OUT/checkpoints/step-NNNNNNN/`` holding
  lora.safetensors   the adapter as of this step, in the run's --format, the same kind of file as the final
                     OUT/adapter.safetensors (`catfast adapter info`, `load_lora_weights`, serve and export
                     load it); one lora-<trigger>.safetensors per concept where the run writes one adapter each
  params.safetensors the trainable LoRA parameters by name (their training dtype, fp32), for --resume
  state.pt           optimizer, lr scheduler and GradScaler state dicts (torch.save; read weights_only)
  rng.pt             python / numpy / torch (CPU, CUDA) global RNG states and the trainer's noise generator
  trainer.json       step, data position (epoch, batch index in that epoch's order), the settings that
                     affect the result and their hash, the world size, and the content identities of
                     the base model and the training images (`content_identities`)
It is written into a hidden ``.step-NNNNNNN.partial-*`` folder, every file fsynced, and renamed into
place only when complete; older checkpoints beyond ``keep`` (0: none is) are removed only after that,
each first renamed to a hidden ``.step-NNNNNNN.prune-*`` folder (an interrupted removal leaves only a
hidden folder, cleaned up by the next save). Any failure (a full disk, a permission error) removes the partial
folder and raises CheckpointError, leaving every checkpoint that existed intact; Ctrl-C (and SIGTERM,
which the trainer turns into one) removes it too. A partial folder carries a staging marker, so one a
SIGKILL left is removed, and named, when the next run into OUT starts. A ``step-*`` folder is therefore
always complete. A checkpoint written before params.safetensors existed kept the parameters
in lora.safetensors; `load_checkpoint` still reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from catfast.adapters.formats import write_adapter
from catfast.errors import CatfastError
from catfast.folders import STAGING_MARKER, mark_staging, remove_stale_staging
from catfast.train.config import TrainConfig, differing_settings

_STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("params.safetensors", "state.pt", "rng.pt", "trainer.json")
_OLD_PARAMS = "lora.safetensors"  # where checkpoints written before params.safetensors kept the parameters


class CheckpointError(CatfastError):
    """A checkpoint cannot be written, read, or resumed from."""


@dataclass
class TrainState:
    """Everything `--resume` needs to continue as if the run had not stopped.

    ``step``: optimizer steps done. ``epoch``, ``batch_index``: the next micro-batch is batch
    ``batch_index`` of epoch ``epoch``'s order. ``lora``: parameter name -> tensor. ``settings``: the
    config's `result_settings()` plus ``world_size``; ``config_hash`` their digest. ``adapters``: file name
    -> (LoraAdapter, format) of the adapter file(s) the checkpoint carries (lora.safetensors).
    """

    step: int
    epoch: int
    batch_index: int
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict
    settings: dict[str, Any]
    config_hash: str
    identities: dict[str, Any] | None = None  # `content_identities` of the run (None: not recorded)
    adapters: dict[str, tuple] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, ascending by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(folder: str | os.PathLike, state: TrainState, *, keep: int = 1) -> Path:
    """Write ``state`` as ``folder/step-NNNNNNN`` atomically, then keep only the newest ``keep`` (0: all)."""

    folder = Path(folder)
    final = folder / checkpoint_name(state.step)
    tmp = folder / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder)
        tmp.mkdir()
        mark_staging(tmp, final.name)
        lora = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.lora.items()}
        save_file(lora, str(tmp / "params.safetensors"), metadata={"step": str(state.step)})
        for name, (adapter, format_) in state.adapters.items():
            write_adapter(adapter, tmp / name, format=format_)
        torch.save(
            {"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler}, tmp / "state.pt"
        )
        torch.save(state.rng, tmp / "rng.pt")
        meta = {
            "step": state.step,
            "epoch": state.epoch,
            "batch_index": state.batch_index,
            "config_hash": state.config_hash,
            "settings": state.settings,
            "identities": state.identities,
        }
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name in (*FILES, *state.adapters):
            _fsync_file(tmp / name)
        (tmp / STAGING_MARKER).unlink()
        if final.exists():  # the same step written again (a resumed run): swap, then drop the old one
            old = folder / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(folder)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for _, p in list_checkpoints(folder)]
        why = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"cannot write the step {state.step} checkpoint in {folder}: {why}. "
            f"Existing checkpoints are intact: {', '.join(kept) or 'none'}"
        ) from e
    except BaseException:  # Ctrl-C, or SIGTERM under sigterm_as_interrupt: no partial folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old_path in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        _prune(old_path)
    return final


def _prune(path: Path) -> None:
    """Remove the checkpoint folder ``path``: renamed to a hidden ``.step-N.prune-*`` name first (one atomic
    step), so a kill during the removal never leaves an incomplete ``step-*`` folder behind."""
    hidden = path.parent / f".{path.name}.prune-{uuid.uuid4().hex[:8]}"
    try:
        path.rename(hidden)
    except OSError:
        return  # still complete and listed; the next save prunes it
    shutil.rmtree(hidden, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> TrainState:
    """Read a checkpoint folder written by `save_checkpoint`."""

    path = Path(path)
    params = path / FILES[0]
    if not params.is_file() and (path / _OLD_PARAMS).is_file():
        params = path / _OLD_PARAMS  # written before params.safetensors existed
    for name in (params.name, *FILES[1:]):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint ({name} is missing)")
    try:
        meta = json.loads((path / "trainer.json").read_text())
        lora = load_file(params)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {type(e).__name__}: {e}") from None
    return TrainState(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        batch_index=int(meta["batch_index"]),
        lora=lora,
        optimizer=state["optimizer"],
        scheduler=state["scheduler"],
        scaler=state["scaler"],
        rng=rng,
        settings=meta["settings"],
        config_hash=meta["config_hash"],
        identities=meta.get("identities"),
    )


def read_settings(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(settings, config hash) of a checkpoint, without loading its tensors."""
    file = Path(path) / "trainer.json"
    try:
        meta = json.loads(file.read_text())
        return meta["settings"], meta["config_hash"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: cannot read checkpoint metadata: {e}") from None


def check_resumable(path: str | os.PathLike, config: TrainConfig, world_size: int = 1) -> None:
    """Raise CheckpointError naming every differing setting when ``path`` was written by a run whose
    result-affecting settings differ from ``config``'s (or ran with another number of processes)."""
    saved, _ = read_settings(path)
    current = run_settings(config, world_size)
    diffs = differing_settings(saved, current)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: it was written with different settings ({'; '.join(diffs)}). "
            "Resume with the same settings, or start a new run in another --out folder"
        )


def content_identities(base, image_digests: list[str], image_names: list[str]) -> dict[str, Any]:
    """What a run's inputs *are*, beyond their paths: ``base`` a digest of the base model's weights
    (`base_identity`) and ``images`` {file: sha256 of its bytes} (the digests the latent cache computes).
    `--resume` compares them with the checkpoint's, so replacing the weights or an image at the same
    path is refused instead of resumed silently."""
    return {"base": base_identity(base), "images": dict(zip(image_names, image_digests))}


def check_identities(path: str | os.PathLike, current: dict[str, Any]) -> None:
    """Raise CheckpointError when the checkpoint at ``path`` recorded other content identities than
    ``current`` (a checkpoint without them, written before they were recorded, is not checked)."""
    file = Path(path) / "trainer.json"
    try:
        saved = json.loads(file.read_text()).get("identities")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{file}: cannot read checkpoint metadata: {e}") from None
    if not saved:
        return
    problems = []
    if saved.get("base") != current["base"]:
        problems.append("the base model's weights changed")
    old, new = saved.get("images", {}), current["images"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        problems.append(f"training images changed, were added or removed: {', '.join(changed[:3])}{more}")
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: {'; '.join(problems)} since it was written. Resume with the same "
            "inputs, or start a new run (--overwrite, or another --out folder)"
        )


_SAMPLES, _CHUNK = 16, 1 << 16


def base_identity(base) -> str:
    """sha256 identity of a base model's weights. Loaded from files: every weight file of the folder
    (and a single UNet file) by size and 16 evenly spaced 64 KiB samples of its bytes (a file under
    1 MiB whole): any replaced weights file changes it, copying or touching the folder does not, and a
    multi-GB model costs milliseconds, not a full read; a single-file checkpoint likewise. Built in memory:
    all of its UNet's weights."""
    h = hashlib.sha256(b"catfast-base-identity/1;")
    files = []
    if base.path is not None:
        folder = Path(base.path)
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")
        )
        files = [(p.relative_to(folder).as_posix(), p) for p in files]
    for name in ("unet_file", "file"):  # a single UNet file; a single-file checkpoint (every component)
        if getattr(base, name, None) is not None:
            files.append((name, Path(getattr(base, name))))
    if files:
        for name, file in files:
            size = file.stat().st_size
            h.update(f"{name}:{size};".encode())
            with file.open("rb") as f:
                if size <= _SAMPLES * _CHUNK:
                    h.update(f.read())
                    continue
                for i in range(_SAMPLES):
                    f.seek((size - _CHUNK) * i // (_SAMPLES - 1))
                    h.update(f.read(_CHUNK))
        return h.hexdigest()
    for key, tensor in base.unet.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_settings(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """What a checkpoint records as its settings: the result settings and the number of processes
    (the global batch and each rank's share of it depend on it)."""
    return {**config.result_settings(), "world_size": world_size}


# ----------------------------------------------------------------------------------------- RNG


def capture_rng(generator: torch.Generator | None = None) -> dict:
    """Global python / numpy / torch (and CUDA) RNG states, and ``generator``'s, as tensors and lists
    (so that ``torch.load(weights_only=True)`` reads them back)."""
    version, internal, gauss = random.getstate()
    rng: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np  # lazy: optional

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:
        pass
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        rng["generator"] = generator.get_state()
    return rng


def restore_rng(rng: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of `capture_rng`."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if generator is not None and "generator" in rng:
        generator.set_state(rng["generator"])


# ------------------------------------------------------------------------------------- helpers


def remove_stale_partials(folder: Path, say=None) -> list[Path]:
    """Remove the ``.step-N.partial-*`` folders of ``folder`` that a killed run left (their staging marker
    names a process that no longer runs: ``catfast.folders.remove_stale_staging``), saying so; run once
    when a training starts. A folder without the marker is left, and named."""
    return remove_stale_staging(Path(folder), ".step-*.partial-", say)


def _remove_stale(folder: Path) -> None:
    """An ``.old-`` folder is a complete checkpoint set aside for a same-step rewrite: put it back when the
    rewrite did not land, else drop it; a ``.prune-`` one was being removed. (Partial folders are removed
    when a run starts, once their marker proves them stale: ``remove_stale_partials``.)"""
    for p in folder.iterdir():
        name, _, tag = p.name.lstrip(".").partition(".")
        if not (p.name.startswith(".step-") and _STEP_DIR.match(name)):
            continue
        if tag.startswith("old-") and not (folder / name).exists():
            p.rename(folder / name)
        elif tag.startswith(("old-", "prune-")):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
