"""Knowledge banks on diffusion transformers (Diff-Tuning's replayed base samples; docs/retention.md):
`catfast bank make --base <FLUX.1 / SD3 / Qwen-Image pipeline folder>` samples one with the family's flow sampler,
and the DiT trainer replays it (`catfast train --bank DIR`, rows drawn by ``BankReplay``).

The folder is the UNet bank's (``catfast.train.bank``: latents and manifest, written atomically): the latents are
the sampler's final latents in the space the transformer trains in (the VAE's, shifted and scaled as
``family.encode_latents`` leaves them), ``[N, C, h, w]`` unpacked, so replaying needs no VAE; the manifest's
``base`` is the pipeline folder's identity (``checkpoint.base_identity``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from catfast.train.bank import Bank, BankError, bank_rows, read_bank, write_bank
from catfast.train.flow_objective import BankRows


def pipeline_identity(folder: str | os.PathLike) -> str:
    """The identity a bank records for the pipeline folder ``folder`` (its weight files, sampled)."""
    from catfast.train.checkpoint import base_identity

    return base_identity(SimpleNamespace(path=str(folder)))


def make_flow_bank(
    folder: str | os.PathLike,
    prompts: list[str],
    n: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    steps: int = 28,
    guidance: float | None = None,
    size: int | None = None,
    batch: int = 16,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Sample ``n`` latents from the DiT pipeline in ``folder`` (row i: ``prompts[i % len(prompts)]``, seed ``seed
    + i``; the family's flow-matching Euler, ``steps``, ``guidance`` (None: the pipeline's default), ``size``
    pixels square (None: the pipeline's default); ``batch`` rows per sampler run) and write the bank ``out``
    (checked before the pipeline loads: not a link or a file; empty unless ``overwrite``)."""
    from catfast.eval.flow_sampler import sample_flow_latents
    from catfast.integrations.families import family_of
    from catfast.integrations.models import quiet_progress_bars

    out, rows, seeds = bank_rows(prompts, n, out, seed, overwrite)
    family = family_of(folder)
    quiet_progress_bars()
    pipe = family.pipeline_type().from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    side = size or pipe.default_sample_size * pipe.vae_scale_factor
    chunks = []
    for start in range(0, n, batch):
        part = slice(start, start + batch)
        chunks.append(sample_flow_latents(pipe, rows[part], adapters=[None] * len(rows[part]), seeds=seeds[part],
                                          steps=steps, guidance=guidance, height=side, width=side,
                                          progress=progress))  # fmt: skip
    used = family.sampling.guidance_default if guidance is None else float(guidance)
    return write_bank(out, torch.cat(chunks), pipeline_identity(folder), rows, seeds, steps=steps, guidance=used,
                      size=side, sampler="flow-euler")  # fmt: skip


def load_flow_bank(path: str | os.PathLike, folder: str | os.PathLike) -> Bank:
    """The bank at ``path``, checked against the pipeline folder ``folder`` (its identity); BankError naming the
    folder and what is wrong otherwise. Its latents' shape is checked against the training latents by
    ``check_shape`` once those are planned."""
    return read_bank(path, pipeline_identity(folder), None, "transformer")


def check_shape(bank: Bank, latent_shape: tuple[int, ...]) -> None:
    """BankError unless the bank's latents are ``latent_shape`` ``(C, h, w)``, the training latents' (the bank rows
    share the concept rows' transformer call)."""
    got = tuple(bank.latents.shape[1:])
    if got != tuple(latent_shape):
        raise BankError(
            f"{bank.folder}: bank latents are {got}, the training latents {tuple(latent_shape)}: make the bank at "
            "the training resolution (catfast bank make --size) or train at the bank's"
        )


class BankReplay:
    """Draws a step's bank rows: ``count(B)`` = max(1, round(B ratio / (1 - ratio))) (B of B + Nb rows carry concept
    data: Diff-Tuning's LWF_ratio), each a bank latent drawn uniformly with fresh noise and a sigma from the
    family's training recipe, conditioned on its prompt (``prompt_offset``: where the bank prompts start in the
    run's encoded prompts, ``FlowDataset.prompt_batch``)."""

    def __init__(self, bank: Bank, ratio: float, weight: float, prompt_offset: int):
        self.bank, self.ratio, self.weight, self.offset = bank, ratio, weight, prompt_offset

    def count(self, batch: int) -> int:
        return max(1, round(batch * self.ratio / (1 - self.ratio)))

    def rows(self, family, dataset, batch: int, generator: torch.Generator, device, dtype) -> BankRows:
        """``BankRows`` for a step of ``batch`` concept rows, drawn with ``generator`` (the run's, so a checkpoint
        resumes the draws); conditions in ``dtype`` (the concept rows')."""
        from catfast.train.flow_objective import sample_flow_inputs

        nb = self.count(batch)
        index = torch.randint(len(self.bank.prompts), (nb,), generator=generator)
        latents = self.bank.latents[index].to(device)  # fp32, as the cached concept latents
        noise, sigmas = sample_flow_inputs(family, latents, generator=generator)
        cond = dataset.prompt_batch((index + self.offset).tolist(), device, dtype)
        return BankRows(latents, noise, sigmas, cond, self.weight)
