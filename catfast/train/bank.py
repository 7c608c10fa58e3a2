"""The knowledge bank (Diff-Tuning, arXiv 2406.00773; docs/retention.md): samples of the base model, made
once before fine-tuning and replayed during it with the true noise as target (no teacher pass).

A bank folder holds two files, each written atomically:
- ``latents.safetensors``: ``latents`` ``[N, C, h, w]`` fp32, the sampler's final latents (the space the
  trainer's cached latents live in: VAE latents times ``scaling_factor``), so training needs no VAE;
- ``manifest.json``: ``format``, ``base`` (`catfast.train.checkpoint.base_identity` of the model that
  sampled it: its weight files by size and sampled bytes, so a copied folder keeps it), ``prompts``
  and ``seeds`` (one per row), the sampler settings (``steps``, ``guidance``, ``size``) and ``n``.

`load_bank` refuses, before any training, a folder that is missing, empty, unreadable, inconsistent,
or made by another base model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from catfast.errors import CatfastError

BANK_FORMAT = "catfast-bank-1"
LATENTS = "latents.safetensors"
MANIFEST = "manifest.json"


class BankError(CatfastError):
    """A knowledge bank folder is missing, unreadable, inconsistent or from another base model."""


@dataclass
class Bank:
    """A loaded bank: ``latents`` ``[N, C, h, w]`` fp32 (CPU), one prompt and seed per row."""

    folder: Path
    latents: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    manifest: dict


def read_prompts(path: str | os.PathLike, what: str = "prompt file") -> list[str]:
    """The non-empty lines of a UTF-8 text file (stripped); CatfastError naming the file when
    it is missing, unreadable or has no prompt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatfastError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CatfastError(f"{path}: cannot read the {what}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CatfastError(f"{path}: the {what} holds no prompt (one prompt per line)")
    return prompts


def make_bank(
    base,
    prompts: list[str],
    n: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    batch: int = 16,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Sample ``n`` latents from ``base`` (row i: ``prompts[i % len(prompts)]``, seed ``seed + i``; DDIM
    ``steps``, CFG ``guidance``; ``batch`` rows per sampler run) and write the bank folder ``out``. The
    folder is checked before sampling (not a link or a file; empty unless ``overwrite``)."""
    from catfast.eval.sampler import sample_images
    from catfast.train.checkpoint import base_identity

    out, rows, seeds = bank_rows(prompts, n, out, seed, overwrite)
    latents = sample_images(
        base,
        rows,
        adapters=[None] * n,
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        max_rows=batch,
        output="latents",
        progress=progress,
    )
    size = base.unet.config.sample_size * base.vae_scale_factor
    return write_bank(out, torch.stack(latents), base_identity(base), rows, seeds, steps=steps, guidance=guidance,
                      size=size)  # fmt: skip


def bank_rows(prompts: list[str], n: int, out, seed: int, overwrite: bool) -> tuple[Path, list[str], list[int]]:
    """(the checked and created bank folder ``out``, each row's prompt ``prompts[i % len]``, its seed ``seed + i``)
    for a bank of ``n`` rows; BankError for n < 1, no prompts, or a folder that may not be written (a link, a
    file, or not empty without ``overwrite``)."""
    from catfast.folders import check_target, ensure_writable_folder

    if n < 1:
        raise BankError(f"--n must be >= 1, got {n}")
    if not prompts:
        raise BankError("no prompts to sample the bank from")
    out = Path(out)
    check_target(out, overwrite, BankError)
    ensure_writable_folder(out, BankError)
    return out, [prompts[i % len(prompts)] for i in range(n)], [seed + i for i in range(n)]


def write_bank(out: Path, latents: torch.Tensor, identity: str, prompts: list[str], seeds: list[int],
               **sampler) -> Path:  # fmt: skip
    """Write the bank folder ``out`` (checked and created by the caller): ``latents`` ``[N, C, h, w]`` and the
    manifest (format, the base's ``identity``, n, shape, prompts, seeds, the ``sampler`` settings), the latents
    first: a manifest is only there once its latents are."""
    from safetensors.torch import save

    from catfast.folders import write_atomic

    stacked = latents.float().contiguous()
    manifest = dict(format=BANK_FORMAT, base=identity, n=len(prompts), shape=list(stacked.shape[1:]), prompts=prompts,
                    seeds=seeds, **sampler)  # fmt: skip
    for stale in (out / MANIFEST, out / LATENTS):
        stale.unlink(missing_ok=True)
    write_atomic(out / LATENTS, save({"latents": stacked}, metadata={"format": BANK_FORMAT}))
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return out


def load_bank(folder: str | os.PathLike, base) -> Bank:
    """The bank in ``folder``, checked against ``base`` (fingerprint, latent channels and size); BankError
    naming the folder and what is wrong otherwise."""
    from catfast.train.checkpoint import base_identity

    side = base.unet.config.sample_size
    return read_bank(folder, base_identity(base), (base.unet.config.in_channels, side, side), "UNet")


def read_bank(folder: str | os.PathLike, fingerprint: str, want: tuple[int, ...] | None, takes: str) -> Bank:
    """The bank in ``folder``, checked: readable, consistent, finite, sampled from the base whose identity is
    ``fingerprint``, latents of shape ``want`` per row (what the ``takes`` model trains on; None: checked by the
    caller); BankError naming the folder and what is wrong otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"{folder}: no such bank folder (make one with `catfast bank make`)")
    manifest_path, latents_path = folder / MANIFEST, folder / LATENTS
    if not manifest_path.is_file() or not latents_path.is_file():
        missing = [p.name for p in (manifest_path, latents_path) if not p.is_file()]
        raise BankError(
            f"{folder}: not a knowledge bank: {', '.join(missing)} missing (make one with `catfast bank make`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BankError(f"{manifest_path}: unreadable bank manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
        raise BankError(f"{manifest_path}: not a {BANK_FORMAT} manifest")
    try:
        from safetensors.torch import load_file

        latents = load_file(str(latents_path))["latents"].float()
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise BankError(f"{latents_path}: unreadable bank latents: {e}") from None
    prompts, seeds = manifest.get("prompts"), manifest.get("seeds")
    n = latents.shape[0] if latents.dim() == 4 else -1
    if n < 1 or not isinstance(prompts, list) or not isinstance(seeds, list) or len(prompts) != n or len(seeds) != n:
        raise BankError(
            f"{folder}: inconsistent bank: latents {tuple(latents.shape)}, "
            f"{len(prompts) if isinstance(prompts, list) else 'no'} prompts, "
            f"{len(seeds) if isinstance(seeds, list) else 'no'} seeds"
        )
    if not torch.isfinite(latents).all():
        raise BankError(f"{latents_path}: the bank latents hold NaN or infinite values")
    if manifest.get("base") != fingerprint:
        raise BankError(
            f"{folder}: this bank was sampled from another base model (identity {str(manifest.get('base'))[:12]}, "
            f"this base {fingerprint[:12]}); make a bank with this --base"
        )
    if want is not None and tuple(latents.shape[1:]) != tuple(want):
        shape = tuple(latents.shape[1:])
        raise BankError(f"{folder}: bank latents are {shape}, this base's {takes} takes {tuple(want)}")
    return Bank(folder, latents, [str(p) for p in prompts], [int(s) for s in seeds], manifest)
