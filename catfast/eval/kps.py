"""Knowledge Preservation Score (KPS) of an adapter: does it keep the base model's behaviour without its
trigger, and produce its concept with it?

The paper's exact formula was not retrieved (the CAT paper, arXiv 2404.07554, describes KPS in words); this is a
provisional engine definition, built from the verified description (CLIP embeddings,
harmonic-mean aggregation) and the CAT repo's similarity helpers:

For every prompt p (a class prompt WITHOUT the trigger) and seed s, three images from the same initial
noise, all in one batched sampler run:
  I_base(p,s)  the base model on p;  I_adp-(p,s)  base + adapter on p;  I_adp+(p,s)  base + adapter on
  "<trigger>, p".
  sim(a, b)   = (cos(f_img(a), f_img(b)) + 1) / 2               image similarity in [0, 1]
  psim(p, a)  = cos(f_text(p), f_img(a))                          prompt similarity, raw cosine
  pres(p,s)   = sim(I_adp-(p,s), I_base(p,s))                     preservation pairing
  id(p,s)     = mean_r sim(I_adp+(p,s), R_r) over the reference images R, when given; otherwise
                mean over the OTHER trigger images q != (p,s) of sim(I_adp+(p,s), I_adp+(q)): identity
                consistency, whether the trigger yields the same concept across prompts and seeds
                (needs >= 2 trigger images)
  preservation = A_{p,s} pres(p,s);  identity = A_{p,s} id(p,s);  KPS = A(preservation, identity)
  prompt_similarity = mean_{p,s} psim(p, I_adp+(p,s))             (cosines can be negative: arithmetic)
with A the harmonic mean (``aggregate="harmonic"``, the default; "arithmetic" for comparison). Per-prompt
rows aggregate over that prompt's seeds the same way. prompt_similarity_base and _without_trigger report
psim of I_base and I_adp- as context.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from catfast.adapters.formats import read_adapter
from catfast.errors import CatfastError
from catfast.eval.encoders import ImageTextEncoder, load_clip
from catfast.eval.grids import save_grid
from catfast.eval.sampler import sample_images
from catfast.folders import IMAGE_SUFFIXES, check_output_file, write_atomic
from catfast.integrations.models import quiet_progress_bars, resolve_base
from catfast.integrations.peft_adapters import attach_adapter

AGGREGATES = ("harmonic", "arithmetic")
KPS_ADAPTER_NAME = "kps_eval"  # the peft name an adapter file is attached under for the evaluation


def harmonic_mean(values: Sequence[float]) -> float:
    """n / sum(1 / v) of non-negative values; 0 when any value is 0 (the harmonic mean's limit).
    Raises ValueError for no values or a negative one."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic mean of no values")
    if min(values) < 0:
        raise ValueError(f"harmonic mean needs non-negative values, got {min(values)}")
    if min(values) == 0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def aggregate(values: Sequence[float], how: str = "harmonic") -> float:
    """The harmonic or arithmetic mean of ``values``."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if how == "harmonic":
        return harmonic_mean(values)
    if not values:
        raise ValueError("mean of no values")
    return sum(float(v) for v in values) / len(values)


def image_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between rows of unit-norm embeddings ``a [N, D]`` and ``b [M, D]`` -> ``[N, M]``, in
    [0, 1] (clamped against rounding)."""
    return ((a.double() @ b.double().T + 1) / 2).clamp(0, 1)


def kps_scores(
    base_emb: torch.Tensor,
    without_emb: torch.Tensor,
    with_emb: torch.Tensor,
    prompt_emb: torch.Tensor | None,
    groups: Sequence[int],
    *,
    reference_emb: torch.Tensor | None = None,
    aggregate_with: str = "harmonic",
) -> dict:
    """The KPS numbers from embeddings (the module docstring's definition). ``base_emb``,
    ``without_emb``, ``with_emb``: ``[M, D]`` unit rows, one per (prompt, seed) sample; ``prompt_emb``:
    ``[M, D]`` text embedding of each sample's prompt, or None (image-only encoder); ``groups[m]``: the
    prompt index of sample m; ``reference_emb`` ``[R, D]`` or None (identity consistency).

    Returns {"samples": [per-sample dicts], "per_prompt": [per-prompt dicts], "total": dict}, each
    with preservation, identity, kps and (when prompt_emb is given) the prompt similarities."""
    m = base_emb.shape[0]
    if not (without_emb.shape[0] == with_emb.shape[0] == len(groups) == m) or m == 0:
        raise ValueError(
            f"need one embedding of each kind per sample, got {m}, {without_emb.shape[0]}, "
            f"{with_emb.shape[0]} and {len(groups)} groups"
        )
    pres = image_similarity(without_emb, base_emb).diagonal()
    if reference_emb is not None:
        if reference_emb.shape[0] == 0:
            raise ValueError("reference_emb has no rows")
        ident = image_similarity(with_emb, reference_emb).mean(dim=1)
    else:
        if m < 2:
            raise CatfastError(
                "identity without reference images compares the trigger images with each other: "
                "give at least 2 (prompt, seed) samples, or reference images"
            )
        pair = image_similarity(with_emb, with_emb)
        ident = (pair.sum(dim=1) - pair.diagonal()) / (m - 1)
    samples = [
        {"group": int(g), "preservation": float(pres[i]), "identity": float(ident[i])} for i, g in enumerate(groups)
    ]
    if prompt_emb is not None:
        for key, emb in (
            ("prompt_similarity", with_emb),
            ("prompt_similarity_base", base_emb),
            ("prompt_similarity_without_trigger", without_emb),
        ):
            cos = (emb.double() * prompt_emb.double()).sum(dim=1)
            for i, row in enumerate(samples):
                row[key] = float(cos[i])

    def summary(rows: list[dict]) -> dict:
        out = {key: aggregate([r[key] for r in rows], aggregate_with) for key in ("preservation", "identity")}
        out["kps"] = aggregate([out["preservation"], out["identity"]], aggregate_with)
        for key in rows[0]:
            if key.startswith("prompt_similarity"):
                out[key] = sum(r[key] for r in rows) / len(rows)
        return out

    order = list(dict.fromkeys(int(g) for g in groups))
    per_prompt = [{"group": g, **summary([r for r in samples if r["group"] == g])} for g in order]
    return {"samples": samples, "per_prompt": per_prompt, "total": summary(samples)}


IDENTITY_HEADS = ("shape", "color", "pattern")  # what identity accuracy asks an attribute encoder to read


def identity_accuracy(read: dict[str, Sequence[str]], concept: dict[str, str], heads=IDENTITY_HEADS) -> float:
    """The share of pictures in which an attribute classifier reads the concept: ``read[head][i]`` is the
    class it reads in picture i for each head of ``heads``; ``concept[head]`` the concept's. A picture counts
    only when every head matches (a yellow striped texture without the star's outline does not). Unlike
    identity (a mean similarity, high for pictures that share most attributes with the concept), this says
    how many pictures show the object. Raises ValueError for no pictures or heads of unequal length."""
    counts = {len(read[h]) for h in heads}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"identity accuracy needs the same positive number of readings per head, got {counts}")
    (n,) = counts
    hits = sum(all(read[h][i] == concept[h] for h in heads) for i in range(n))
    return hits / n


def with_trigger(prompt: str, trigger: str) -> str:
    """The prompt with the trigger prepended as in CAT's captions: "<trigger>, <prompt>"."""
    return f"{trigger}, {prompt}"


def kps_eval(
    base,
    adapter: str | os.PathLike,
    prompts: Sequence[str],
    seeds: Sequence[int],
    trigger: str,
    encoder: ImageTextEncoder,
    reference_images: Sequence | None = None,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    scale: float = 1.0,
    size: int | None = None,
    max_rows: int | None = None,
    aggregate_with: str = "harmonic",
    grid_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """Generate base / adapter-without-trigger / adapter-with-trigger images for every (prompt, seed) in
    one batched sampler run (``max_rows`` samples per UNet call at most; None = all 3 * P * S rows), embed
    them with ``encoder`` (CLIP, or any ImageTextEncoder: an image-only one gives no prompt similarity)
    and score them (module docstring).

    adapter: the name of a peft adapter on ``base.unet``, or an adapter safetensors file, attached for
    the evaluation and removed after. prompts: class prompts without the trigger. reference_images:
    PIL images of the concept for identity (else identity consistency among the trigger images).
    grid_path: also write a PNG grid, one row per (prompt, seed): base | without | with trigger.

    Returns a JSON-ready dict: "definition" (the formulas used), "settings", "per_prompt" (prompt and
    its scores), "samples" (per (prompt, seed)), "total"."""
    prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
    _check_inputs(prompts, seeds, trigger, aggregate_with)
    pairs = [(i, s) for i in range(len(prompts)) for s in seeds]
    sampling = dict(steps=steps, guidance=guidance, scale=scale, size=size, progress=progress, max_rows=max_rows)
    images = _sample_triples(base, adapter, prompts, pairs, trigger, sampling)
    emb = encoder.embed_images(images)
    try:
        prompt_emb = encoder.embed_texts([prompts[i] for i, _ in pairs])
    except NotImplementedError:
        prompt_emb = None
    refs = encoder.embed_images(list(reference_images)) if reference_images else None
    scores = kps_scores(
        emb[0::3],
        emb[1::3],
        emb[2::3],
        prompt_emb,
        [i for i, _ in pairs],
        reference_emb=refs,
        aggregate_with=aggregate_with,
    )
    for row, (i, s) in zip(scores["samples"], pairs):
        row.update(prompt=prompts[row.pop("group")], seed=s)
    for row in scores["per_prompt"]:
        row["prompt"] = prompts[row.pop("group")]
    if grid_path is not None:
        heads = ["base", "adapter, without trigger", f'adapter, "{trigger}, ..."']
        save_grid(
            images, len(pairs), 3, grid_path, labels=[f"{prompts[i]} / seed {s}" for i, s in pairs], col_labels=heads
        )
    return {
        "definition": _definition(aggregate_with, refs is not None),
        "settings": {
            "trigger": trigger,
            "seeds": seeds,
            "steps": steps,
            "guidance": guidance,
            "scale": scale,
            "size": size,
            "references": 0 if refs is None else int(refs.shape[0]),
        },
        "per_prompt": scores["per_prompt"],
        "samples": scores["samples"],
        "total": scores["total"],
    }


def _check_inputs(prompts: list[str], seeds: list[int], trigger: str, aggregate_with: str) -> None:
    """CatfastError for no prompts or seeds, no trigger, or a prompt that already holds the trigger."""
    if not prompts:
        raise CatfastError("KPS needs at least one prompt")
    if not seeds:
        raise CatfastError("KPS needs at least one seed")
    if not trigger or not trigger.strip():
        raise CatfastError("KPS needs the adapter's trigger word")
    for p in prompts:
        if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", p):
            raise CatfastError(
                f"prompt {p!r} already contains the trigger {trigger!r}; KPS prompts are class "
                "prompts without it (the trigger is prepended for the identity images)"
            )
    if aggregate_with not in AGGREGATES:
        raise ValueError(f"aggregate_with must be one of {AGGREGATES}, got {aggregate_with!r}")


def _sample_triples(base, adapter, prompts: list[str], pairs: list[tuple[int, int]], trigger: str, sampling: dict):
    """One batched sampler run: per (prompt, seed) the triple base | adapter without | adapter with the
    trigger (so ``max_rows`` chunks mix all three); an adapter file is attached for the run only."""
    name, attached = _adapter_name(base, adapter)
    try:
        row_prompts = [q for i, _ in pairs for q in (prompts[i], prompts[i], with_trigger(prompts[i], trigger))]
        return sample_images(
            base,
            row_prompts,
            adapters=[None, name, name] * len(pairs),
            seeds=[s for _, s in pairs for _ in range(3)],
            **sampling,
        )
    finally:
        if attached:
            base.unet.delete_adapters(name)


def _definition(aggregate_with: str, with_references: bool) -> dict:
    """The formulas a KPS result was computed with (its "definition" entry)."""
    return {
        "similarity": "image: (cos + 1) / 2 of the encoder's image embeddings; prompt: raw cosine",
        "preservation": "sim(adapter without trigger, base), same prompt and seed",
        "identity": "mean sim(adapter with trigger, reference images)"
        if with_references
        else "mean sim(adapter with trigger, the other trigger images) (identity consistency)",
        "aggregate": f"{aggregate_with} mean over (prompt, seed); kps = {aggregate_with} mean of "
        "preservation and identity; prompt similarity: arithmetic mean",
        "provisional": "engine definition from docs/method.md section 3, not the CAT paper's formula",
    }


def _adapter_name(base, adapter) -> tuple[str, bool]:
    """(peft adapter name to sample with, whether we attached it from a file)."""

    configs = getattr(base.unet, "peft_config", None) or {}
    if isinstance(adapter, str) and adapter in configs:
        return adapter, False
    path = Path(adapter)
    if not path.exists():
        raise CatfastError(
            f"{adapter}: neither an adapter file nor an adapter on the UNet (it has {list(configs) or 'none'})"
        )
    if KPS_ADAPTER_NAME in configs:
        raise CatfastError(f"the UNet already has an adapter named {KPS_ADAPTER_NAME!r}")
    attach_adapter(base.unet, read_adapter(path, models={"unet": base.unet}), KPS_ADAPTER_NAME)
    return KPS_ADAPTER_NAME, True


_COLUMNS = (("preservation", "preserve"), ("identity", "identity"), ("prompt_similarity", "prompt sim"), ("kps", "KPS"))


def format_kps_table(result: dict) -> str:
    """A plain-text table: one line per prompt, then the total (columns without a value are left out)."""
    columns = [(key, title) for key, title in _COLUMNS if key in result["total"]]
    rows = [(r["prompt"], r) for r in result["per_prompt"]] + [("TOTAL", result["total"])]
    width = min(max(len(label) for label, _ in rows), 60)
    lines = [f"{'prompt':<{width}}  " + "  ".join(f"{title:>10}" for _, title in columns)]
    lines.append("-" * len(lines[0]))
    for label, r in rows:
        label = label if len(label) <= width else label[: width - 3] + "..."
        lines.append(f"{label:<{width}}  " + "  ".join(f"{r[key]:>10.4f}" for key, _ in columns))
    return "\n".join(lines)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CatfastError(f"{path}: cannot read the prompts file: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CatfastError(f"{path}: the prompts file has no prompts (one per line; # starts a comment)")
    return prompts


def read_images(path: str | os.PathLike) -> list:
    """RGB PIL images of an image file or of every image file in a folder (sorted by name)."""

    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CatfastError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise CatfastError(f"{path}: no such file or folder of reference images")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise CatfastError(f"{f}: not a readable image: {e}") from None
    return images


def run_kps_cli(
    base_path: str | os.PathLike,
    adapter_file: str | os.PathLike,
    prompts_file: str | os.PathLike,
    clip_path: str | os.PathLike,
    trigger: str,
    seeds: int | Sequence[int],
    steps: int,
    out_json: str | os.PathLike | None = None,
    *,
    references: str | os.PathLike | None = None,
    guidance: float = 7.5,
    scale: float = 1.0,
    size: int | None = None,
    max_rows: int | None = None,
    aggregate_with: str = "harmonic",
    grid_path: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    encoder: ImageTextEncoder | None = None,
) -> dict:
    """`catfast eval kps`: load the base (``resolve_base``: a diffusers folder, or a UNet file with
    ``config``), the adapter file, the prompts file (one per line), the CLIP folder (or take ``encoder``,
    with ``clip_path`` None: `catfast eval kps --base demo` scores with the demo's encoder) and the optional
    reference images (file or folder), run ``kps_eval`` and, with ``out_json``, write the result there
    atomically. ``seeds``: a count n (seeds 0..n-1) or the seeds. Every input is checked before the
    model is loaded (output places too: a folder, a link or an unwritable place is refused); bad input
    raises CatfastError naming the file. ``base_path`` "demo": the shipped demo model."""

    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    prompts = read_prompts(prompts_file)
    if not Path(adapter_file).is_file():
        raise CatfastError(f"{adapter_file}: no such adapter file")
    for target in (out_json, grid_path):  # replaced when they exist, but checked before any work
        if target is not None:
            check_output_file(target, True, CatfastError)
    quiet_progress_bars()
    encoder = encoder if encoder is not None else load_clip(clip_path, device=device)
    refs = read_images(references) if references is not None else None
    base = resolve_base(base_path, config=config, dtype=dtype, device=device)
    result = kps_eval(
        base,
        Path(adapter_file),
        prompts,
        seeds,
        trigger,
        encoder,
        refs,
        steps=steps,
        guidance=guidance,
        scale=scale,
        size=size,
        max_rows=max_rows,
        aggregate_with=aggregate_with,
        grid_path=grid_path,
        progress=progress,
    )
    result["settings"].update(
        base=str(base_path),
        adapter=str(adapter_file),
        prompts_file=str(prompts_file),
        clip=None if clip_path is None else str(clip_path),
        encoder=type(encoder).__name__,
    )
    if out_json is not None:
        write_atomic(out_json, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result
