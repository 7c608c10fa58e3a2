"""The DiT trainer's latent and condition cache (``train.flow_trainer``, step 3 of its run): one safetensors entry
per image under OUT/cache (or ``cache_dir``) holding its variants' latents ``[V, C, h, w]`` fp32
(``family.encode_latents``: a posterior sample seeded by the image's hash, so an entry is reproducible) and the
condition dicts of its caption and trigger-stripped caption (``family.encode_prompt``, one caption per call: no
padding), and ``FlowDataset``, the cached set in memory. Only a build with misses loads the text encoders; they
and the VAE are dropped before the transformer is loaded."""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from catfast.errors import CatfastError
from catfast.folders import write_atomic
from catfast.integrations.families import DenoiserFamily
from catfast.train.cache import _read_bytes
from catfast.train.config import TrainConfig
from catfast.train.data import Example, image_size, load_image
from catfast.train.run_parts import transform_for
from catfast.train.transform import ImagePlan, Transform, plan_image, render

FLOW_CACHE_FORMAT = "catfast-flow-cache/1"


@dataclass
class _FlowEntry:
    """One image's cached tensors: ``latents`` ``[V, C, h, w]`` fp32; ``cond`` / ``cond_stripped`` the
    condition dicts of its caption / stripped caption, one row each without the batch axis (fp32)."""

    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    cond_stripped: dict[str, torch.Tensor]


class FlowDataset:
    """The cached training set in memory, batched by `batch_order` (via `BatchStream`) like the UNet's:
    ``len``, ``num_variants``, ``bucket``; `batch` stacks entries on the device. ``optional``: condition keys
    the family returned as None (Qwen-Image's ``prompt_embeds_mask`` for an unpadded caption)."""

    def __init__(self, examples: list[Example], plans: list[ImagePlan], entries: list[_FlowEntry], digests,
                 optional: set[str], prompt_conds: list[dict] = ()):  # fmt: skip
        self.examples, self.plans, self.entries = list(examples), list(plans), list(entries)
        self.digests, self.optional = list(digests), set(optional)
        self.prompt_conds = list(prompt_conds)  # one condition dict per held prompt (``build_flow_cache(prompts=)``)

    def __len__(self) -> int:
        return len(self.entries)

    def num_variants(self, example: int) -> int:
        return self.entries[example].latents.shape[0]

    def bucket(self, example: int) -> tuple[int, int]:
        h, w = self.entries[example].latents.shape[-2:]
        return int(h), int(w)

    def batch(self, keys, device, dtype, replace: dict[int, int] | None = None) -> tuple[torch.Tensor, dict, dict]:
        """(latents ``[B, C, h, w]`` fp32, cond, cond_stripped) of the (example, variant) ``keys`` on
        ``device``; floating condition tensors in ``dtype``. ``replace``: {row: index into ``prompt_conds``}, rows
        whose trigger caption's condition is that prompt's instead (caption dropout)."""
        rows = [self.entries[e] for e, _ in keys]
        latents = torch.stack([self.entries[e].latents[v] for e, v in keys]).to(device)
        conds = [self.prompt_conds[replace[i]] if replace and i in replace else r.cond for i, r in enumerate(rows)]
        cond = self._stack(conds, device, dtype)
        return latents, cond, self._stack([r.cond_stripped for r in rows], device, dtype)

    def prompt_batch(self, indices: list[int], device, dtype) -> dict:
        """The condition of held prompts ``indices`` (into ``build_flow_cache``'s ``prompts``), one row each, on
        ``device``, stacked (and padded) as ``batch`` stacks captions."""
        return self._stack([self.prompt_conds[i] for i in indices], device, dtype)

    def _stack(self, conds: list[dict], device, dtype) -> dict:
        """Rows stacked per key. Rows of one key that differ in length (Qwen-Image's captions) are zero-padded
        at the end, with ``<key>_mask`` (1: a caption token) built where the family has that key: what the
        family's pipeline does to a batch of captions."""
        out = {}
        for key in conds[0]:
            tensors = [c[key] for c in conds]
            if len({t.shape for t in tensors}) > 1:
                if f"{key}_mask" not in self.optional:
                    raise CatfastError(f"captions give {key} of different shapes and no padding mask; use batch 1")
                length = max(t.shape[0] for t in tensors)
                mask = torch.zeros(len(tensors), length, dtype=torch.long)
                for i, t in enumerate(tensors):
                    mask[i, : t.shape[0]] = 1
                tensors = [torch.cat([t, t.new_zeros(length - t.shape[0], *t.shape[1:])]) for t in tensors]
                out[f"{key}_mask"] = mask.to(device)
            stacked = torch.stack(tensors)
            out[key] = stacked.to(device, dtype if stacked.is_floating_point() else stacked.dtype)
        return out


def build_flow_cache(folder: Path, family: DenoiserFamily, examples: list[Example], config: TrainConfig,
                     cache_dir: Path, device: torch.device, progress: bool, prompts: list[str] = ()):  # fmt: skip
    """(FlowDataset, the names of the freed encoders with weak references to them). ``prompts``: held prompts
    (extra CAT prompts, kept adapters' prompts) encoded too, one per call, into ``FlowDataset.prompt_conds``
    (not cached on disk: they load the text encoders in every run that has them).

    Every image is read and planned before any encoder loads (a small or unreadable image fails first). An
    entry's file is ``cache_dir/<key>.safetensors``, key = sha256 of (format, `_model_identity`, the image's
    sha256, both captions, ``Transform.key()``, bucket step), written atomically; a damaged one is encoded
    again with a warning. Text encoders and the VAE are dropped from the pipeline and collected here."""
    from catfast.integrations.models import quiet_progress_bars  # lazy: diffusers

    quiet_progress_bars()
    index = json.loads((folder / "model_index.json").read_text())
    encoders = [k for k in index if k.startswith("text_encoder") and index[k] and index[k][0]]
    # the VAE, tokenizers and scheduler alone: the image geometry, before the text encoders are known to be needed
    light = family.pipeline_type().from_pretrained(folder, local_files_only=True, transformer=None,
                                                   **dict.fromkeys(encoders))  # fmt: skip
    transform, step = _transform(folder, family, light, config)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CatfastError(f"{cache_dir}: cannot create the latent cache folder: {e}") from None
    model_id = _model_identity(folder, index, family)
    planned = []  # (example, plan, digest, cache file)
    for ex in examples:
        data = _read_bytes(ex.image)
        digest = hashlib.sha256(data).hexdigest()
        plan = plan_image(ex.image, image_size(ex.image, data), transform, step, digest)
        blob = [FLOW_CACHE_FORMAT, model_id, digest, ex.caption, ex.caption_stripped, transform.key(), step]
        key = hashlib.sha256(json.dumps(blob).encode()).hexdigest()
        planned.append((ex, plan, digest, cache_dir / f"{key}.safetensors"))

    entries, optional, seen, pipe = [], set(), {}, None
    for ex, plan, digest, path in tqdm(planned, desc="caching latents", unit="img", disable=not progress):
        if path in seen:  # a repeated example (kohya repeats) shares its entry
            entries.append(seen[path])
            continue
        loaded = _load_entry(path, plan)
        if loaded is None:
            if pipe is None:  # the text encoders, only for a build with misses
                pipe = type(light).from_pretrained(folder, local_files_only=True, transformer=None, vae=light.vae)
                pipe.to(device)
            loaded = _encode(pipe, family, ex, plan, digest)
            _write_entry(path, *loaded, ex)
        entry, none_keys = loaded
        optional |= none_keys
        entries.append(entry)
        seen[path] = entry
    prompt_conds = []
    if prompts:
        if pipe is None:
            pipe = type(light).from_pretrained(folder, local_files_only=True, transformer=None, vae=light.vae)
            pipe.to(device)
        for prompt in prompts:
            cond, none_keys = _encode_caption(pipe, family, prompt)
            optional |= none_keys
            prompt_conds.append(cond)
    freed = []  # drop every encoder: the pipelines are the only holders, so they are collected here
    for p in (pipe, light):
        for name in (*encoders, "vae"):
            module = getattr(p, name, None) if p is not None else None
            if module is not None:
                freed.append((name, weakref.ref(module)))
                setattr(p, name, None)
    del pipe, light, module
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dataset = FlowDataset([p[0] for p in planned], [p[1] for p in planned], entries, [p[2] for p in planned], optional,
                          prompt_conds)  # fmt: skip
    return dataset, list(dict(freed).items())


def _transform(folder: Path, family: DenoiserFamily, light, config: TrainConfig) -> tuple[Transform, int]:
    """The image transform and bucket step: sides multiples of the VAE's scale x the family's patch; the
    default resolution the transformer's native one (``sample_size``, else the pipeline's default)."""
    scale = light.vae_scale_factor
    multiple = scale * family.patch
    resolution = config.resolution
    if resolution is None:
        native = family.denoiser_type().load_config(folder, subfolder=family.denoiser_key).get("sample_size")
        resolution = (native or getattr(light, "default_sample_size", 128)) * scale
    if not config.buckets and resolution % multiple:
        raise CatfastError(
            f"resolution {resolution} is not a multiple of {multiple}, which this model needs (VAE x patch); "
            f"use {max(multiple, resolution // multiple * multiple)}"
        )
    transform = transform_for(config, resolution)
    return transform, max(8 * scale, multiple)


@torch.no_grad()
def _encode(pipe, family: DenoiserFamily, example: Example, plan: ImagePlan, digest: str):
    """(entry, the condition keys the family returned as None) of one image."""
    data = _read_bytes(example.image)
    if hashlib.sha256(data).hexdigest() != digest:  # the entry's key must describe what it holds
        raise CatfastError(f"{example.image}: the image changed while the cache was being built; run again")
    pixels = render(load_image(example.image, data), plan).to(pipe.vae.device)
    generator = torch.Generator().manual_seed(int(digest[:15], 16))  # the image's own sample, in every run
    latents = family.encode_latents(pipe.vae, pixels, generator=generator).float().cpu()
    cond, none_a = _encode_caption(pipe, family, example.caption)
    stripped, none_b = _encode_caption(pipe, family, example.caption_stripped)
    return _FlowEntry(latents, cond, stripped), none_a | none_b


@torch.no_grad()
def _encode_caption(pipe, family: DenoiserFamily, caption: str) -> tuple[dict, set[str]]:
    """(one caption's condition dict, fp32 on the CPU, without its None keys; those keys). One caption a call:
    no padding between captions."""
    cond = family.encode_prompt(pipe, [caption])
    return {k: v[0].float().cpu() for k, v in cond.items() if v is not None}, {k for k, v in cond.items() if v is None}


def _write_entry(path: Path, entry: _FlowEntry, none_keys: set[str], example: Example) -> None:
    tensors = {"latents": entry.latents}
    tensors |= {f"cond.{k}": v for k, v in entry.cond.items()}
    tensors |= {f"stripped.{k}": v for k, v in entry.cond_stripped.items()}
    meta = {"format": FLOW_CACHE_FORMAT, "image": str(example.image), "none_keys": json.dumps(sorted(none_keys))}
    try:
        write_atomic(path, safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, meta))
    except OSError as e:  # the temp file is already removed; existing entries are untouched
        raise CatfastError(f"{path}: cannot write the cache entry for {example.image}: {e}") from None


def _load_entry(path: Path, plan: ImagePlan):
    """(entry, its None keys) at ``path``, or None when it is missing, unreadable or of the wrong shape."""
    import warnings

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FLOW_CACHE_FORMAT:
                raise ValueError(f"not a {FLOW_CACHE_FORMAT} file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        latents = tensors["latents"]
        if latents.dim() != 4 or latents.shape[0] != len(plan.variants):
            raise ValueError(f"latents {tuple(latents.shape)} for {len(plan.variants)} variants")
        cond = {k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")}
        stripped = {k.removeprefix("stripped."): v for k, v in tensors.items() if k.startswith("stripped.")}
        return _FlowEntry(latents, cond, stripped), set(json.loads(meta["none_keys"]))
    except Exception as e:  # safetensors raises several types for truncated/garbage files
        warnings.warn(f"{path}: cache entry is unreadable or damaged ({e}); encoding it again", stacklevel=3)
        return None


def _model_identity(folder: Path, index: dict, family: DenoiserFamily) -> str:
    """sha256 of what the cached tensors depend on: the folder, and the names, sizes and mtimes of every
    component's files but the transformer's and the scheduler's (no multi-GB hashing per run), and the
    diffusers version (the pipelines' encode_prompt code)."""
    h = hashlib.sha256(f"{FLOW_CACHE_FORMAT};{family.name};fp32;{importlib.metadata.version('diffusers')}".encode())
    h.update(str(folder.resolve()).encode())
    for name in sorted(k for k in index if not k.startswith("_") and k not in (family.denoiser_key, "scheduler")):
        if (folder / name).is_dir():
            for file in sorted(p for p in (folder / name).rglob("*") if p.is_file()):
                st = file.stat()
                h.update(f"{file.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()
