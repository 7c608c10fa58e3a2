"""Measure E4T against plain LoRA and CAT on held-out concepts of the demo world.

    OMP_NUM_THREADS=1 python -m catfast.e4t.measure --out DIR [--concepts a,b] [--seeds 0,1] ...

For each held-out concept (default: the three objects of the shipped demo adapters) and each training
seed, from the ONE picture ``concepts.reference_views(c)[0]`` (on grey):
- E4T (``personalize``) after each of ``e4t_steps`` tuning steps, and with the CAT term (weight 1) after
  each of ``e4t_cat_steps`` (default: the largest of ``e4t_steps``); ``e4t_lr`` (when given) sets both
  tuning learning rates (offsets and v*) and the rows' method names carry it ("e4t@lr0.003");
- plain LoRA (cat_weight 0) and CAT (cat_weight 1) trained by ``catfast train`` on that one picture
  ("sks, a <class> on a grey background") with ``catfast demo``'s settings (rank 4, lr 1e-3, batch 4)
  for each of ``baseline_steps``.
Every adapter samples the class prompts ("a <class>", on grey, on green) without and with "sks, " in
front over sampling seeds 0..k-1 (DDIM 20 steps, guidance 5, as the demo), and the base model the class
prompts. The demo's attribute encoder scores, as ``catfast demo`` does: preservation (adapter without the
trigger against the base picture of the same prompt and seed), identity (trigger pictures against the
five reference pictures of the concept), KPS. A "base" row per concept (the base model, "sks" meaning
nothing) is the floor identity starts from. Wall times: E4T's tuning (models loaded) and its whole call;
``catfast train``'s own total; each row also records the 1-minute load average when it finished (the
machine may be shared). Writes DIR/results.jsonl (a header line: command, threads, torch, git; then one
row per run), DIR/grid.md (means over concepts and seeds, then differences against CAT-300 paired by
concept and seed) and DIR/grid.png (trigger pictures of the first concept and seed).

    python -m catfast.e4t.measure --out x --summarize DIR/results.jsonl     # the tables again
    python -m catfast.e4t.measure --out DIR --regrid CONCEPT,SEED,PNG        # a grid of another concept
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from catfast.adapters.formats import read_adapter
from catfast.demo import world
from catfast.demo.encoder import load_encoder as load_attribute_encoder
from catfast.demo.run import TRAIN
from catfast.e4t import concepts as cc
from catfast.e4t.personalize import TuneSettings, personalize
from catfast.e4t.results import _header, _row, read_results, report
from catfast.eval.grids import save_grid
from catfast.eval.kps import kps_scores, with_trigger
from catfast.eval.sampler import sample_images
from catfast.folders import write_atomic
from catfast.integrations.models import load_base
from catfast.integrations.peft_adapters import _remove, attach_adapter
from catfast.integrations.word_embedding import install_from_metadata
from catfast.shipped import encoder_path, model_path
from catfast.train.config import TrainConfig
from catfast.train.trainer import train

SAMPLE = dict(steps=20, guidance=5.0)


def class_prompts(class_word: str) -> list[str]:
    return [f"a {class_word}", f"a {class_word} on a grey background", f"a {class_word} on a green background"]


def _sample(base, adapter_path, prompts, seeds, label):
    """Images of ``prompts`` x ``seeds`` on the adapter (its E4T embedding installed while sampling)."""
    rows = [(p, s) for p in prompts for s in seeds]
    if adapter_path is None:
        return sample_images(
            base, [p for p, _ in rows], adapters=[None] * len(rows), seeds=[s for _, s in rows], **SAMPLE
        )
    adapter = read_adapter(adapter_path)
    saved = install_from_metadata(base.text_encoder, base.tokenizer, adapter.metadata, str(adapter_path))
    attach_adapter(base.unet, adapter, label)
    try:
        return sample_images(
            base, [p for p, _ in rows], adapters=[label] * len(rows), seeds=[s for _, s in rows], **SAMPLE
        )
    finally:
        _remove(base.unet, label, had_peft=False)
        if saved is not None:
            weight, row, previous = saved
            with torch.no_grad():
                weight[row] = previous


def _train_baseline(model, data, work, cat_weight, steps, seed):
    """(adapter path, training seconds) of ``catfast train`` with the demo's settings on the folder ``data``."""
    config = TrainConfig(
        base=str(model),
        data=str(data),
        trigger=world.TRIGGER,
        out=str(work / f"{'cat' if cat_weight else 'plain'}-{steps}-s{seed}"),
        cache_dir=str(work / "cache"),
        cat_weight=cat_weight,
        seed=seed,
        checkpoint_every=0,
        device="cpu",
        # rank 4 with mirror images: the demo's settings when docs/e4t.md's baselines were measured (the demo now
        # trains rank 16 without them)
        **{**TRAIN, "rank": 4, "steps": steps, "random_flip": True},
    )
    result = train(config, overwrite=True, progress=False)
    return result.adapters[world.TRIGGER], result.seconds


@dataclass
class _Prepared:
    """One concept's inputs: its data folder (the one picture and caption ``catfast train`` reads), the class
    prompts, the scorer's embeddings of the base model's pictures of them (prompts x sample seeds, prompt-major)
    and of the five references, and the base model's "base" row with its trigger pictures."""

    concept: object
    folder: Path
    data: Path
    prompts: list[str]
    base_emb: torch.Tensor
    ref_emb: torch.Tensor
    refs: list
    base_plus_images: list
    base_row: dict


def _prepare(base, scorer, out: Path, name: str, sseeds: list[int]) -> _Prepared:
    """Write OUT/<name>/data/00.png and 00.txt (the input picture, on grey) and score the base model (the floor:
    its trigger pictures, "sks" meaning nothing to it, against the references)."""
    concept = _concept(name)
    refs = [world.render(s) for s in cc.reference_views(concept)]
    folder = out / name
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    refs[0].save(data / "00.png")
    scene0 = cc.reference_views(concept)[0]
    (data / "00.txt").write_text(f"{world.TRIGGER}, a {concept.shape} on a {scene0.background} background\n")
    prompts = class_prompts(concept.shape)
    base_emb = scorer.embed_images(_sample(base, None, prompts, sseeds, "base"))
    ref_emb = scorer.embed_images(refs)
    base_plus_images = _sample(base, None, [with_trigger(p, world.TRIGGER) for p in prompts], sseeds, "base")
    base_plus = scorer.embed_images(base_plus_images)
    groups = [p for p in range(len(prompts)) for _ in sseeds]
    scores = kps_scores(base_emb, base_emb, base_plus, None, groups, reference_emb=ref_emb)["total"]
    row = _row(name, None, "base", 0, 0.0, 0.0, scores)
    return _Prepared(concept, folder, data, prompts, base_emb, ref_emb, refs, base_plus_images, row)


def _runs(e4t_steps, e4t_cat_steps, e4t_lr, baseline_steps) -> list[tuple[str, int, float]]:
    """(method, steps, CAT weight) of each run on one concept and seed, in order (module docstring)."""
    runs = []
    suffix = "" if e4t_lr is None else f"@lr{e4t_lr:g}"
    runs += [("e4t" + suffix, steps, 0.0) for steps in e4t_steps]
    cat_steps = ([max(e4t_steps)] if e4t_steps else []) if e4t_cat_steps is None else e4t_cat_steps
    runs += [("e4t+cat" + suffix, steps, 1.0) for steps in cat_steps]
    for method, cw in (("plain", 0.0), ("cat", 1.0)):
        runs += [(method, s, cw) for s in baseline_steps]
    return runs


def _run(base, scorer, prep: _Prepared, name: str, seed: int, run: tuple, assets, lrs: dict, sseeds: list[int]):
    """(result row, trigger pictures) of one run: train the adapter (E4T: ``personalize``; else ``catfast
    train``), sample the class prompts without and with the trigger, score them."""
    method, steps, cw = run
    label = f"{method}-{steps}"
    t0 = time.perf_counter()
    if method.startswith("e4t"):
        r = personalize(
            prep.data / "00.png",
            prep.concept.shape,
            prep.folder / "adapters",
            name=f"{label}-s{seed}",
            settings=TuneSettings(steps=steps, cat_weight=cw, seed=seed, **lrs),
            assets=assets,
            base=base,
            overwrite=True,
        )
        path, seconds, total = r.adapter, r.seconds, time.perf_counter() - t0
    else:
        path, seconds = _train_baseline(model_path(), prep.data, prep.folder / "runs", cw, steps, seed)
        total = seconds
    prompts = prep.prompts
    minus = scorer.embed_images(_sample(base, path, prompts, sseeds, "a"))
    plus_images = _sample(base, path, [with_trigger(p, world.TRIGGER) for p in prompts], sseeds, "a")
    plus = scorer.embed_images(plus_images)
    groups = [p for p in range(len(prompts)) for _ in sseeds]
    total_scores = kps_scores(prep.base_emb, minus, plus, None, groups, reference_emb=prep.ref_emb)["total"]
    return _row(name, seed, method, steps, seconds, total, total_scores), plus_images


def _write_results(out: Path, header: dict, rows: list[dict]) -> None:
    """Rewrite OUT/results.jsonl (header, then the rows) and OUT/grid.md."""
    lines = [json.dumps(header)] + [json.dumps(r) for r in rows]
    write_atomic(out / "results.jsonl", ("\n".join(lines) + "\n").encode())
    write_atomic(out / "grid.md", report(rows).encode())


def measure(
    out: str | Path,
    *,
    concepts: list[str] = ("striped-star", "tiger-ball", "toy-box"),
    seeds: list[int] = (0, 1),
    e4t_steps: list[int] = (0, 5, 15),
    e4t_cat_steps: list[int] | None = None,
    e4t_lr: float | None = None,
    baseline_steps: list[int] = (15, 50, 300),
    sample_seeds: int = 4,
    assets: str | Path | None = None,
    log=print,
) -> list[dict]:
    """Run the measurement (module docstring), writing under ``out`` as it goes; returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = _header(
        dict(
            concepts=list(concepts),
            seeds=list(seeds),
            e4t_steps=list(e4t_steps),
            e4t_cat_steps=None if e4t_cat_steps is None else list(e4t_cat_steps),
            e4t_lr=e4t_lr,
            baseline_steps=list(baseline_steps),
            sample_seeds=sample_seeds,
        )
    )
    scorer = load_attribute_encoder(encoder_path())
    base = load_base(model_path())
    rows: list[dict] = []
    grid_cells: dict[str, list] = {}
    sseeds = list(range(sample_seeds))
    prepared = {}
    for name in concepts:
        prep = prepared[name] = _prepare(base, scorer, out, name, sseeds)
        rows.append(prep.base_row)
        log(json.dumps(rows[-1]))
        if name == concepts[0]:
            grid_cells["references (1st: the input)"] = prep.refs[: len(sseeds)]
            grid_cells["base"] = prep.base_plus_images[: len(sseeds)]
    lrs = {} if e4t_lr is None else dict(lr=e4t_lr, embed_lr=e4t_lr)
    runs = _runs(e4t_steps, e4t_cat_steps, e4t_lr, baseline_steps)
    for seed in seeds:  # seeds outside: a run cut short still has every concept
        for name in concepts:
            for run in runs:
                row, plus_images = _run(base, scorer, prepared[name], name, seed, run, assets, lrs, sseeds)
                rows.append(row)
                log(json.dumps(row))
                if name == concepts[0] and seed == seeds[0]:
                    grid_cells[f"{run[0]}-{run[1]}"] = plus_images[: len(sseeds)]
                _write_results(out, header, rows)
    write_atomic(out / "grid.md", report(rows).encode())
    _save_grid(grid_cells, out / "grid.png", f'"{with_trigger(class_prompts(_shape(concepts[0]))[0], world.TRIGGER)}"')
    return rows


def regrid(
    out: str | Path,
    name: str,
    seed: int,
    png: str | Path,
    labels: tuple[str, ...] = ("e4t-0", "e4t-15", "e4t+cat-15", "plain-300", "cat-300"),
    sample_seeds: int = 4,
) -> None:
    """A grid like the measurement's for another concept and training seed, sampled again from the adapters
    an earlier ``measure(out, ...)`` wrote under ``out`` (same prompt, seeds and sampler settings; images,
    not scores). ``labels``: "<method>-<steps>" of runs that wrote adapters. PNG of at most 256 colours."""
    out = Path(out)
    concept = _concept(name)
    base = load_base(model_path())
    prompt = with_trigger(class_prompts(concept.shape)[0], world.TRIGGER)
    seeds = list(range(sample_seeds))
    cells = {"references (1st: the input)": [world.render(s) for s in cc.reference_views(concept)][:sample_seeds]}
    cells["base"] = _sample(base, None, [prompt], seeds, "b")
    for label in labels:
        if label.startswith("e4t"):
            path = out / name / "adapters" / f"{label}-s{seed}.safetensors"
        else:
            path = out / name / "runs" / f"{label}-s{seed}" / "adapter.safetensors"
        cells[label] = _sample(base, path, [prompt], seeds, "a")
    raw = Path(png).with_suffix(".rgb.png")
    _save_grid(cells, raw, f'"{prompt}"')
    with Image.open(raw) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
            png, optimize=True
        )
    raw.unlink()


def _concept(name: str):
    """The held-out concept called ``name`` (a named one of the shipped adapters, else one of ``cc.split()[1]``);
    StopIteration when there is none."""
    return cc.NAMED_HELD_OUT.get(name) or next(c for c in cc.split()[1] if c.name == name)


def _shape(name: str) -> str:
    return _concept(name).shape


def _save_grid(cells: dict[str, list], path: Path, prompt: str) -> None:
    if not cells:
        return
    cols = len(next(iter(cells.values())))
    images = [im for label in cells for im in cells[label]]  # save_grid enlarges the 32 px pictures (nearest)
    save_grid(
        images,
        len(cells),
        cols,
        path,
        labels=[k if k.startswith("references") else f"{k}: {prompt}" for k in cells],
        col_labels=[f"seed {i}" for i in range(cols)],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="E4T vs plain LoRA and CAT on held-out demo concepts.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--concepts", default="striped-star,tiger-ball,toy-box")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--e4t-steps", default="0,5,15")
    parser.add_argument("--baseline-steps", default="15,50,300", help='"" for none')
    parser.add_argument("--e4t-cat-steps", default=None, help="E4T + CAT term runs (default: the largest --e4t-steps)")
    parser.add_argument("--e4t-lr", type=float, default=None, help="both tuning learning rates (default: 1e-3)")
    parser.add_argument("--sample-seeds", type=int, default=4)
    parser.add_argument("--assets", default=None, help="E4T files folder (default: the shipped ones)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--summarize",
        metavar="RESULTS_JSONL[,MORE]",
        help="only print the tables of results files (rows of several files together: a run of variants is "
        "paired with the CAT-300 rows of another; repeated base rows are dropped)",
    )
    parser.add_argument(
        "--regrid",
        metavar="CONCEPT,SEED,PNG",
        help="only draw a grid of CONCEPT (training seed SEED) from the adapters an earlier run wrote in --out",
    )
    args = parser.parse_args(argv)
    if args.regrid:
        torch.set_num_threads(args.threads)
        name, seed, png = args.regrid.split(",", 2)
        regrid(args.out, name, int(seed), png, sample_seeds=args.sample_seeds)
        return
    if args.summarize:
        rows, seen = [], set()
        for path in args.summarize.split(","):
            for r in read_results(path)[1]:
                key = (r["concept"], r["method"], r["steps"], r["seed"])
                if not (r["method"] == "base" and key in seen):
                    rows.append(r)
                seen.add(key)
        print(report(rows), end="")
        return
    torch.set_num_threads(args.threads)

    def ints(s):
        return [int(x) for x in s.split(",") if x]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        measure(
            args.out,
            concepts=[c for c in args.concepts.split(",") if c],
            seeds=ints(args.seeds),
            e4t_steps=ints(args.e4t_steps),
            e4t_cat_steps=None if args.e4t_cat_steps is None else ints(args.e4t_cat_steps),
            e4t_lr=args.e4t_lr,
            baseline_steps=ints(args.baseline_steps),
            sample_seeds=args.sample_seeds,
            assets=args.assets,
            log=lambda m: print(m, flush=True),
        )


if __name__ == "__main__":
    main()
