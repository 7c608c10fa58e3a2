"""The cached training set: VAE latents of every image variant and text embeddings of both captions,
computed once and stored on disk, then the batches the trainer draws from them.

One safetensors file per example, ``CACHE_DIR/<key>.safetensors``, with key = sha256 of (cache format,
`model_identity`, sha256 of the image bytes, caption, stripped caption, ``Transform.key()``, bucket
step). A changed image, caption, transform or model gives a new key; entries of other runs are left in
place. Files are written atomically (temp file in the same folder, then rename), so concurrent or
killed builds leave either a complete entry or none; an entry that does not load or has the wrong
shapes is encoded again with a warning.

Entry tensors: ``latents`` [V, C, h, w] fp32 (scaled VAE means of the V variants, see
`catfast.train.data`), ``hidden`` [2, L, D] (caption, stripped caption; the text encoder's output in
the encoding dtype) and, for SDXL, ``pooled`` [2, P] and ``time_ids`` [V, 6].
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from catfast.errors import CatfastError
from catfast.folders import write_atomic
from catfast.train.data import Example, image_size, load_image
from catfast.train.transform import (
    ImagePlan,
    Transform,
    bucket_step,
    plan_image,
    render,
    sdxl_time_ids,
    size_multiple,
)

CACHE_FORMAT = "catfast-latent-cache/1"


@dataclass
class _Entry:
    latents: torch.Tensor  # [V, C, h, w] fp32
    hidden: torch.Tensor  # [2, L, D]: caption, stripped caption
    pooled: torch.Tensor | None = None  # [2, P] (SDXL)
    time_ids: torch.Tensor | None = None  # [V, 6] (SDXL)


class LatentDataset:
    """The cached training set, in memory. Item ``(example, variant)`` is a dict: ``latents`` [C, h, w]
    fp32; ``cond`` / ``cond_stripped`` the text conditions of the caption with / without the trigger
    ([L, D], or for SDXL {"encoder_hidden_states": [L, D], "added_cond_kwargs": {"text_embeds": [P],
    "time_ids": [6]}}) in the encoding dtype; ``concept``, ``example``, ``variant`` ints; ``bucket`` the
    latent (h, w). ``examples``, ``plans`` (each image's `ImagePlan`) and ``digests`` (each image file's
    sha256, hex; empty when not given) are public."""

    def __init__(self, examples: list[Example], plans: list[ImagePlan], entries: list[_Entry], digests: list[str] = ()):
        self.examples, self.plans, self._entries = list(examples), list(plans), list(entries)
        self.digests = list(digests)

    def __len__(self) -> int:
        return len(self._entries)

    def num_variants(self, example: int) -> int:
        return self._entries[example].latents.shape[0]

    def bucket(self, example: int) -> tuple[int, int]:
        """Latent (h, w) of the example's variants."""
        h, w = self._entries[example].latents.shape[-2:]
        return int(h), int(w)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        example, variant = key
        entry = self._entries[example]
        if not 0 <= variant < entry.latents.shape[0]:
            raise IndexError(f"example {example} has {entry.latents.shape[0]} variants, not {variant + 1}")
        conds = []
        for row in (0, 1):
            if entry.pooled is None:
                conds.append(entry.hidden[row])
            else:
                added = {"text_embeds": entry.pooled[row], "time_ids": entry.time_ids[variant]}
                conds.append({"encoder_hidden_states": entry.hidden[row], "added_cond_kwargs": added})
        return dict(
            latents=entry.latents[variant],
            cond=conds[0],
            cond_stripped=conds[1],
            concept=self.examples[example].concept,
            example=example,
            variant=variant,
            bucket=self.bucket(example),
        )


def build_cache(
    base,
    examples: list[Example],
    transform: Transform,
    cache_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> LatentDataset:
    """Encode what the cache lacks and load the rest; return the whole set as a LatentDataset.

    Every image is read and planned first (so an image smaller than its target, or unreadable, fails
    before any model work). Missing entries are encoded with base.vae (the mean of the latent
    distribution, times scaling_factor) and the text encoder(s) on ``device`` in ``dtype`` (an fp16 VAE
    with ``force_upcast``, like SDXL's, runs in fp32). Afterwards base.vae and base.text_encoder(s) are
    on "cpu" (in ``dtype`` if they were encoded with; an all-hit build leaves their dtype alone).
    """

    if not examples:
        raise CatfastError("no training examples to cache")
    if not transform.buckets and transform.resolution % size_multiple(base) != 0:
        m = size_multiple(base)
        raise CatfastError(
            f"resolution {transform.resolution} is not a multiple of {m}, which this model needs "
            f"(VAE x UNet downsampling); use {max(m, transform.resolution // m * m)}"
        )
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CatfastError(f"{cache_dir}: cannot create the latent cache folder: {e}") from None
    step = bucket_step(base)
    model_id = model_identity(base, dtype)

    planned = []  # (example, plan, image digest, cache file)
    for ex in examples:
        data = _read_bytes(ex.image)
        digest = hashlib.sha256(data).hexdigest()
        plan = plan_image(ex.image, image_size(ex.image, data), transform, step, digest)
        key = hashlib.sha256(
            json.dumps(
                [CACHE_FORMAT, model_id, digest, ex.caption, ex.caption_stripped, transform.key(), step]
            ).encode()
        ).hexdigest()
        planned.append((ex, plan, digest, cache_dir / f"{key}.safetensors"))

    entries, encoder, seen = [], None, {}
    bar = tqdm(planned, desc="caching latents", unit="img", disable=not progress)
    for ex, plan, digest, path in bar:
        if path in seen:  # a repeated example (kohya repeats) shares its entry
            entries.append(seen[path])
            continue
        entry = _load_entry(path, plan, base)
        if entry is None:
            if encoder is None:
                encoder = _Encoder(base, device, dtype)
            entry = encoder.encode(ex, plan, digest)
            _write_entry(path, entry, ex)
        entries.append(entry)
        seen[path] = entry
    _offload(base)
    return LatentDataset([p[0] for p in planned], [p[1] for p in planned], entries, [p[2] for p in planned])


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CatfastError(f"{path}: cannot read the image file: {e}") from None


class _Encoder:
    """The VAE and text encoder(s), moved to the device on first use (only builds with misses pay)."""

    def __init__(self, base, device, dtype):
        self.base, self.device = base, torch.device(device)
        vae_dtype = dtype
        if dtype == torch.float16 and getattr(base.vae.config, "force_upcast", False):
            vae_dtype = torch.float32  # SDXL's VAE overflows in fp16
        for module, want in [(base.vae, vae_dtype)] + [(e, dtype) for e in _text_encoders(base)]:
            module.to(self.device)
            if module.dtype != want:  # cast only when needed: diffusers warns on every .to(dtype=...)
                module.to(want)

    @torch.no_grad()
    def encode(self, example: Example, plan: ImagePlan, digest: str) -> _Entry:
        base, vae = self.base, self.base.vae
        data = _read_bytes(example.image)
        if hashlib.sha256(data).hexdigest() != digest:  # the entry's key must describe what it holds
            raise CatfastError(f"{example.image}: the image changed while the cache was being built; run again")
        pixels = render(load_image(example.image, data), plan).to(self.device, vae.dtype)
        z = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((z.float() - shift) * vae.config.scaling_factor).cpu()
        cond = base.encode_prompt([example.caption, example.caption_stripped])
        if not base.is_sdxl:
            return _Entry(latents=latents, hidden=cond.cpu())
        hidden = cond["encoder_hidden_states"].cpu()
        pooled = cond["added_cond_kwargs"]["text_embeds"].cpu()
        return _Entry(latents=latents, hidden=hidden, pooled=pooled, time_ids=sdxl_time_ids(plan).to(hidden.dtype))


def _text_encoders(base) -> list:
    return [e for e in (base.text_encoder, base.text_encoder_2) if e is not None]


def _offload(base) -> None:
    """Move the VAE and text encoder(s) to the CPU and return their device memory to the driver."""
    moved = False
    for module in [base.vae, *_text_encoders(base)]:
        moved |= next(module.parameters()).device.type != "cpu"
        module.to("cpu")
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_entry(path: Path, entry: _Entry, example: Example) -> None:

    tensors = {"latents": entry.latents, "hidden": entry.hidden}
    if entry.pooled is not None:
        tensors.update(pooled=entry.pooled, time_ids=entry.time_ids)
    meta = {"format": CACHE_FORMAT, "image": str(example.image), "caption": example.caption}
    try:
        write_atomic(path, safetensors.torch.save({k: v.cpu().contiguous() for k, v in tensors.items()}, meta))
    except OSError as e:  # the temp file is already removed; existing entries are untouched
        raise CatfastError(f"{path}: cannot write the cache entry for {example.image}: {e}") from None


def _load_entry(path: Path, plan: ImagePlan, base) -> _Entry | None:
    """The entry at ``path``, or None when it is missing, or unreadable / of the wrong shape (warned)."""
    if not path.is_file():
        return None

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != CACHE_FORMAT:
                raise ValueError(f"not a {CACHE_FORMAT} file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        entry = _Entry(**tensors)
        problem = _shape_problem(entry, plan, base)
        if problem:
            raise ValueError(problem)
    except Exception as e:  # safetensors raises several types for truncated/garbage files
        warnings.warn(f"{path}: cache entry is unreadable or damaged ({e}); encoding it again", stacklevel=3)
        return None
    return entry


def _shape_problem(entry: _Entry, plan: ImagePlan, base) -> str | None:
    tw, th = plan.target
    f = base.vae_scale_factor
    want = (len(plan.variants), base.vae.config.latent_channels, th // f, tw // f)
    if tuple(entry.latents.shape) != want:
        return f"latents {tuple(entry.latents.shape)}, expected {want}"
    if entry.hidden.dim() != 3 or entry.hidden.shape[0] != 2:
        return f"hidden {tuple(entry.hidden.shape)}, expected [2, L, D]"
    if base.is_sdxl and (entry.pooled is None or entry.time_ids is None or entry.time_ids.shape != (want[0], 6)):
        return "SDXL entry without pooled embeddings or time_ids per variant"
    return None


def model_identity(base, dtype: torch.dtype) -> str:
    """sha256 of what the cached tensors depend on: the VAE, text encoder(s) and tokenizer(s) and the
    encoding dtype (the UNet does not matter). For a base loaded from a folder: that folder and the
    names, sizes and mtimes of those components' files (no multi-GB hashing per run); for one built in
    memory: their weights and vocabularies."""
    h = hashlib.sha256(f"{CACHE_FORMAT};dtype={dtype}".encode())
    names = ["vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if base.is_sdxl else [])
    folder = Path(base.path) if base.path is not None else None
    if folder is not None and all((folder / n).is_dir() for n in names):
        h.update(str(folder.resolve()).encode())
        for name in names:
            for file in sorted(p for p in (folder / name).rglob("*") if p.is_file()):
                st = file.stat()
                h.update(f"{file.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()
    for name in names:
        component = getattr(base, name)
        if name.startswith("tokenizer"):
            vocab = sorted(component.get_vocab().items())
            h.update(json.dumps([type(component).__name__, component.model_max_length, vocab]).encode())
            continue
        config = component.config.to_dict() if hasattr(component.config, "to_dict") else dict(component.config)
        h.update(json.dumps([name, type(component).__name__, config], default=str, sort_keys=True).encode())
        for key, tensor in component.state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# batches


def collate(items: list[dict]) -> dict:
    """Stack LatentDataset items of one bucket: ``latents`` [B, C, h, w], ``cond`` / ``cond_stripped``
    [B, L, D] (or the SDXL dict with a batch dim on every tensor), ``concepts``, ``examples`` and
    ``variants`` as int64 [B]."""
    if not items:
        raise ValueError("collate needs at least one item")
    buckets = {item["bucket"] for item in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch must come from one bucket; got latent sizes {sorted(buckets)}")
    return dict(
        latents=torch.stack([item["latents"] for item in items]),
        cond=_stack([item["cond"] for item in items]),
        cond_stripped=_stack([item["cond_stripped"] for item in items]),
        concepts=torch.tensor([item["concept"] for item in items], dtype=torch.long),
        examples=torch.tensor([item["example"] for item in items], dtype=torch.long),
        variants=torch.tensor([item["variant"] for item in items], dtype=torch.long),
    )


def _stack(conds: list):
    if isinstance(conds[0], dict):
        return {key: _stack([c[key] for c in conds]) for key in conds[0]}
    return torch.stack(conds)


def batch_order(
    dataset: LatentDataset, batch_size: int, seed: int, epoch: int, *, drop_last: bool = False
) -> list[list[tuple[int, int]]]:
    """One epoch's batches of (example, variant) keys, a pure function of (dataset sizes, batch_size,
    seed, epoch): examples shuffled, each with a uniformly drawn variant, grouped by bucket in shuffled
    order and cut into batches of ``batch_size`` (the last batch of a bucket may be smaller unless
    ``drop_last``), then the batches shuffled. Every example appears once; every batch has one bucket."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"catfast-batch-order:{seed}:{epoch}")  # str seeds hash the same in every process
    order = list(range(len(dataset)))
    rng.shuffle(order)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in order:
        groups.setdefault(dataset.bucket(i), []).append((i, rng.randrange(dataset.num_variants(i))))
    batches = [
        group[k : k + batch_size]
        for group in groups.values()
        for k in range(0, len(group), batch_size)
        if not drop_last or k + batch_size <= len(group)
    ]
    if not batches:
        raise CatfastError(
            f"batch size {batch_size} with drop_last leaves no batch: every aspect bucket has fewer images "
            f"({', '.join(str(len(g)) for g in groups.values())}); lower the batch size or turn buckets off"
        )
    rng.shuffle(batches)
    return batches
