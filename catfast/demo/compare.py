"""`catfast demo --compare cat,cat-guidance,bank,lifelong`: the retention methods (docs/retention.md)
against plain LoRA and CAT on the demo world, same seed and step budget (``run.TRAIN``) for every adapter.

Methods (plain LoRA and CAT are always trained: they are the baselines):
- ``cat``: the paper's CAT (``cat_weight`` 1, stripped captions only);
- ``cat-guidance``: CAT with ``cat_prompts = "stripped+empty"`` (the empty prompt guidance subtracts);
- ``bank``: Diff-Tuning: plain LoRA (``cat_weight`` 0) with a knowledge bank (``BANK_N`` samples of the
  base on ``BANK_PROMPTS`` world captions, made with ``catfast.train.bank.make_bank``), ``bank_ratio``
  0.2, ``bank_weight`` 0.1, concept timesteps from ``chain-of-forgetting``;
- ``lifelong``: a second concept (the tiger ball of ``catfast.demo.adapters``, trigger "tiger") learned
  after the striped star, stacked on the star's CAT adapter A: B trained as plain LoRA, as CAT, and as
  CAT with ``keep = [A]``. Scored on base + A + B (A merged into the weights, B attached).

Scores as `catfast demo` (``run`` module docstring): preservation, identity, identity accuracy, diversity, KPS
per method,
plus ``colour_preservation`` (the mean per-prompt preservation of the two prompts that name a colour)
and ``step_seconds`` (training seconds per step after the first). For ``lifelong``: ``identity`` is the
star's identity after learning the ball (previous-concept forgetting), ``identity_new`` the ball's
(``identity_accuracy``, ``identity_accuracy_new``: the same as shares of pictures read as the star and the ball),
``preservation`` the mean over the star and ball class prompts (relevant-concept forgetting), and
``variants`` holds the numbers of B trained as plain LoRA, CAT and with ``--keep``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from catfast.adapters.formats import read_adapter
from catfast.adapters.merge import merge_adapter_
from catfast.demo import world
from catfast.demo.adapters import CONCEPTS, concept_scenes
from catfast.demo.adapters import write_concept as write_other
from catfast.demo.encoder import concept_accuracy
from catfast.demo.run import PROMPTS, SAMPLE, TRAIN, UNET_EXTRA, diversity, prepare, sample_blocks
from catfast.errors import CatfastError
from catfast.eval.grids import save_grid
from catfast.eval.kps import harmonic_mean, kps_scores, with_trigger
from catfast.folders import write_atomic
from catfast.integrations.models import load_base
from catfast.integrations.peft_adapters import attach_adapter
from catfast.train.bank import make_bank
from catfast.train.config import TrainConfig
from catfast.train.trainer import train

COMPARE = ("cat", "cat-guidance", "bank", "lifelong")
COLOUR_PROMPTS = ("a red star", "a white star on a blue background")
BALL_PROMPTS = tuple(p.replace("star", "ball") for p in PROMPTS)
BANK_N = 64  # bank samples
BANK_PROMPTS = 32  # distinct world captions they are drawn on (world.dataset(..., seed=BANK_SEED))
BANK_SEED = 7  # not the pretraining captions' seed 0: the bank is what the base draws, not its data
BANK_DIR = "knowledge-bank"  # not "bank": that is the bank-trained adapter's output folder (OUT/<method>)
SECOND = "tiger-ball"  # the lifelong run's second concept (catfast.demo.adapters.CONCEPTS)


def parse_methods(spec: str) -> list[str]:
    """The comparison list of ``--compare a,b``: known names, in the order given, no repeats."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARE]
    if unknown or not names:
        raise CatfastError(f"--compare takes a comma-separated list of {', '.join(COMPARE)}; got {spec!r}")
    return list(dict.fromkeys(names))


def _config(name: str, model: Path, data: Path, trigger: str, out: Path, seed: int, steps: int, **overrides):
    return TrainConfig(
        base=str(model),
        data=str(data),
        trigger=trigger,
        out=str(out / name),
        cache_dir=str(out / "cache"),
        seed=seed,
        checkpoint_every=0,
        device="cpu",
        **{**TRAIN, **UNET_EXTRA, "steps": steps, **overrides},
    )


def _bank_prompts() -> list[str]:
    return list(dict.fromkeys(caption for _, caption in world.dataset(4 * BANK_PROMPTS, seed=BANK_SEED)))[:BANK_PROMPTS]


def run_compare(
    out: str | os.PathLike,
    methods: list[str],
    *,
    seed: int = 0,
    seeds: int = 8,
    overwrite: bool = False,
    steps: int = TRAIN["steps"],
    sample_steps: int = SAMPLE["steps"],
    assets: str | os.PathLike | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train, sample and score every method of ``methods`` (module docstring) in ``out``; writes
    results.json and one grid per comparison (grid-<method>.png) and returns the results."""
    t0 = time.perf_counter()
    out, model, encoder, references = prepare(out, overwrite, assets)
    configs = _configs(methods, model, out, seed, steps, sample_steps, log)
    results: dict = {}
    adapters: dict[str, Path] = {}
    for name, config in configs.items():
        log(f"training {name}: {steps} steps")
        result = train(config, overwrite=True, progress=progress)
        adapters[name] = result.adapters[world.TRIGGER]
        results[name] = _timing(result)
    lifelong = _train_lifelong(model, out, seed, steps, adapters["cat"], progress, log) if "lifelong" in methods else {}

    pairs = [(p, s) for p in range(len(PROMPTS)) for s in range(seeds)]
    images, emb, ref = _sample_and_score(
        results, model, adapters, bool(lifelong), encoder, references, pairs, sample_steps, progress, log
    )
    grids = {}
    for name in [n for n in methods if n != "lifelong"]:
        shown = ["plain", "cat"] if name == "cat" else ["cat", name]
        grids[name] = _grid(out / f"grid-{name}.png", images, shown, seeds)
    if lifelong:
        log("sampling the lifelong variants: base + star adapter (merged) + each second adapter")
        trigger2, fields2 = CONCEPTS[SECOND]
        results["lifelong"] = _lifelong(
            model,
            adapters["cat"],
            lifelong,
            pairs,
            seeds,
            emb,
            ref,
            encoder,
            concept_scenes(fields2),
            trigger2,
            sample_steps,
            progress,
            out,
            grids,
        )
    results.update(
        seconds=round(time.perf_counter() - t0, 1),
        grids={k: str(v) for k, v in grids.items()},
        settings=dict(
            seed=seed,
            seeds=seeds,
            methods=methods,
            prompts=list(PROMPTS),
            train={**TRAIN, **UNET_EXTRA, "steps": steps},
            sample={**SAMPLE, "steps": sample_steps},
            bank=dict(n=BANK_N, prompts=BANK_PROMPTS, ratio=0.2, weight=0.1),
        ),
    )
    write_atomic(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    return results


def _configs(methods, model: Path, out: Path, seed: int, steps: int, sample_steps: int, log) -> dict:
    """The training config of every single-concept method, by name (plain and cat always); makes the
    knowledge bank in ``out`` first when ``bank`` is asked for."""
    concept = out / "concept"
    configs = {
        "plain": _config("plain", model, concept, world.TRIGGER, out, seed, steps, cat_weight=0.0),
        "cat": _config("cat", model, concept, world.TRIGGER, out, seed, steps, cat_weight=1.0),
    }
    if "cat-guidance" in methods:
        configs["cat-guidance"] = _config(
            "cat-guidance", model, concept, world.TRIGGER, out, seed, steps, cat_prompts="stripped+empty"
        )
    if "bank" in methods:
        log(f"making the knowledge bank: {BANK_N} base samples on {BANK_PROMPTS} world captions")
        make_bank(
            load_base(model),
            _bank_prompts(),
            BANK_N,
            out / BANK_DIR,
            seed=1000,
            steps=sample_steps,
            guidance=SAMPLE["guidance"],
            batch=BANK_N,
            overwrite=True,
        )
        bank = dict(cat_weight=0.0, bank=str(out / BANK_DIR), timesteps="chain-of-forgetting")
        configs["bank"] = _config("bank", model, concept, world.TRIGGER, out, seed, steps, **bank)
    return configs


def _train_lifelong(model: Path, out: Path, seed: int, steps: int, star: Path, progress: bool, log) -> dict:
    """The second concept (``SECOND``) trained on top of CAT's star adapter ``star`` as plain LoRA, CAT and
    CAT ``keep=[star]``: variant -> (adapter file, timing)."""
    trigger2, fields2 = CONCEPTS[SECOND]
    write_other(out / "concept2", trigger2, fields2)
    lifelong = {}
    for variant, overrides in (
        ("plain", dict(cat_weight=0.0)),
        ("cat", dict(cat_weight=1.0)),
        ("keep", dict(cat_weight=1.0, keep=[str(star)])),
    ):
        log(f"training the second concept ({SECOND}) on top of CAT's star adapter: {variant}, {steps} steps")
        name = f"lifelong-{variant}"
        result = train(
            _config(name, model, out / "concept2", trigger2, out, seed, steps, **overrides),
            overwrite=True,
            progress=progress,
        )
        lifelong[variant] = (result.adapters[trigger2], _timing(result))
    return lifelong


def _sample_and_score(results, model, adapters, with_ball, encoder, references, pairs, sample_steps, progress, log):
    """Sample base and every single-concept adapter without and with the trigger (one batched run, plus the
    base on the ball prompts for the lifelong scores), add each method's scores and the base's diversity to
    ``results``; returns (images by block, embeddings by block, reference embeddings)."""
    groups = [p for p, _ in pairs]
    single = list(adapters)
    log(f"sampling {len(PROMPTS)} prompts x {len(pairs) // len(PROMPTS)} seeds: base and {', '.join(single)}")
    base = load_base(model)
    with warnings.catch_warnings():  # peft warns that a second adapter makes the model multi-adapter: intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name, path in adapters.items():
            attach_adapter(base.unet, read_adapter(path, models={"unet": base.unet}), name)
    blocks = [("base", None, PROMPTS, None)]
    if with_ball:
        blocks.append(("base-ball", None, BALL_PROMPTS, None))
    for name in single:
        blocks += [(f"{name}-", name, PROMPTS, None), (f"{name}+", name, PROMPTS, world.TRIGGER)]
    images = sample_blocks(base, blocks, pairs, sample_steps, progress)
    emb = {k: encoder.embed_images(v) for k, v in images.items()}
    ref = encoder.embed_images(references)
    for name in single:
        results[name].update(_scores(emb["base"], emb[f"{name}-"], emb[f"{name}+"], ref, groups))
        results[name]["identity_accuracy"] = round(concept_accuracy(encoder, images[f"{name}+"]), 4)
    results["base"] = {"diversity": round(diversity(emb["base"], groups), 4)}
    return images, emb, ref


def _timing(result) -> dict:
    rate = result.steps_per_second
    return {"train_seconds": round(result.seconds, 1), "step_seconds": round(1 / rate, 4) if rate else None}


def _scores(base, without, with_, ref, groups) -> dict:

    kps = kps_scores(base, without, with_, None, groups, reference_emb=ref)
    per_prompt = {PROMPTS[row["group"]]: round(row["preservation"], 4) for row in kps["per_prompt"]}
    total = kps["total"]
    return dict(
        preservation=round(total["preservation"], 4),
        identity=round(total["identity"], 4),
        diversity=round(diversity(without, groups), 4),
        kps=round(total["kps"], 4),
        colour_preservation=round(sum(per_prompt[p] for p in COLOUR_PROMPTS) / len(COLOUR_PROMPTS), 4),
        per_prompt=per_prompt,
    )


def _grid(path: Path, images: dict, shown: list[str], seeds: int) -> Path:
    """Rows: base, each shown adapter without the trigger, then each with it, on the first prompt."""

    cells, labels = [], []
    rows = [("base", f'base: "{PROMPTS[0]}"')]
    rows += [(f"{n}-", f"{n}, without trigger") for n in shown]
    rows += [(f"{n}+", f'{n}: "{with_trigger(PROMPTS[0], world.TRIGGER)}"') for n in shown]
    for key, label in rows:
        cells += images[key][:seeds]  # save_grid enlarges the 32 px samples (nearest)
        labels.append(label)
    save_grid(cells, len(labels), seeds, path, labels=labels, col_labels=[f"seed {s}" for s in range(seeds)])
    return path


def _lifelong(
    model, first, variants, pairs, seeds, emb, ref, encoder, scenes2, trigger2, sample_steps, progress, out, grids
):
    """Base + A (merged) + B_variant on the star and ball prompts, with and without each trigger."""

    base = load_base(model)
    merge_adapter_(base.unet, read_adapter(first, models={"unet": base.unet}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for variant, (path, _) in variants.items():
            attach_adapter(base.unet, read_adapter(path, models={"unet": base.unet}), variant)
    blocks = []
    for variant in variants:
        blocks += [
            (f"{variant}:star-", variant, PROMPTS, None),
            (f"{variant}:star+", variant, PROMPTS, world.TRIGGER),
            (f"{variant}:ball-", variant, BALL_PROMPTS, None),
            (f"{variant}:ball+", variant, BALL_PROMPTS, trigger2),
        ]
    images = sample_blocks(base, blocks, pairs, sample_steps, progress)
    lemb = {k: encoder.embed_images(v) for k, v in images.items()}
    ref2 = encoder.embed_images([world.render(s) for s in scenes2])
    groups = [p for p, _ in pairs]
    numbers = {}
    for variant, (_, timing) in variants.items():
        star = kps_scores(
            emb["base"], lemb[f"{variant}:star-"], lemb[f"{variant}:star+"], None, groups, reference_emb=ref
        )
        ball = kps_scores(
            emb["base-ball"], lemb[f"{variant}:ball-"], lemb[f"{variant}:ball+"], None, groups, reference_emb=ref2
        )
        preservation = (star["total"]["preservation"] + ball["total"]["preservation"]) / 2
        identity = star["total"]["identity"]
        numbers[variant] = dict(
            preservation=round(preservation, 4),
            identity=round(identity, 4),
            identity_new=round(ball["total"]["identity"], 4),
            identity_accuracy=round(concept_accuracy(encoder, images[f"{variant}:star+"]), 4),
            identity_accuracy_new=round(concept_accuracy(encoder, images[f"{variant}:ball+"], CONCEPTS[SECOND][1]), 4),
            preservation_star=round(star["total"]["preservation"], 4),
            preservation_ball=round(ball["total"]["preservation"], 4),
            diversity=round(
                (diversity(lemb[f"{variant}:star-"], groups) + diversity(lemb[f"{variant}:ball-"], groups)) / 2, 4
            ),
            kps=round(harmonic_mean([preservation, identity]), 4),
            **timing,
        )

    cells, labels = [], []
    for variant in variants:
        for part, prompt in (
            ("star+", with_trigger(PROMPTS[0], world.TRIGGER)),
            ("ball+", with_trigger(BALL_PROMPTS[0], trigger2)),
        ):
            cells += images[f"{variant}:{part}"][:seeds]
            labels.append(f'A + B {variant}: "{prompt}"')
    grids["lifelong"] = out / "grid-lifelong.png"
    save_grid(
        cells, len(labels), seeds, grids["lifelong"], labels=labels, col_labels=[f"seed {s}" for s in range(seeds)]
    )
    return {**numbers["keep"], "variants": numbers}


def format_compare(results: dict) -> str:
    """The comparison as a plain-text table (one row per method; the lifelong variants below)."""
    head = f"{'':<16}{'preservation':>14}{'colour pres':>13}{'identity':>10}{'id. acc':>9}{'diversity':>11}"
    head += f"{'KPS':>8}{'s/step':>8}"
    lines = [head, "-" * len(head)]
    for name in ("plain", "cat", "cat-guidance", "bank"):
        if name in results:
            r = results[name]
            lines.append(
                f"{name:<16}{r['preservation']:>14.4f}{r['colour_preservation']:>13.4f}{r['identity']:>10.4f}"
                f"{r['identity_accuracy']:>9.3f}{r['diversity']:>11.4f}{r['kps']:>8.4f}"
                f"{r['step_seconds'] or float('nan'):>8.3f}"
            )
    if "lifelong" in results:
        lines.append("lifelong (base + star adapter + ball adapter B): identity = the star's after the ball")
        for variant, r in results["lifelong"]["variants"].items():
            lines.append(
                f"  B {variant:<12}{r['preservation']:>14.4f}{'':>13}{r['identity']:>10.4f}"
                f"{r['identity_accuracy']:>9.3f}{r['diversity']:>11.4f}{r['kps']:>8.4f}"
                f"{r['step_seconds'] or float('nan'):>8.3f}   ball identity {r['identity_new']:.4f}"
                f" (accuracy {r['identity_accuracy_new']:.3f})"
            )
    lines.append(f"{'base model':<16}{'':>14}{'':>13}{'':>10}{'':>9}{results['base']['diversity']:>11.4f}")
    lines.append(
        "id. acc: identity accuracy, the share of trigger pictures read as the concept's shape, colour, pattern"
    )
    return "\n".join(lines)


def summary(results: dict) -> dict:
    """The ``--json`` last line: one object per method by name, with preservation, identity, diversity, kps."""
    keys = ("preservation", "identity", "identity_accuracy", "diversity", "kps", "colour_preservation")
    keys += ("step_seconds", "train_seconds")
    out = {
        name: {k: results[name][k] for k in keys if k in results[name]}
        for name in ("plain", "cat", "cat-guidance", "bank")
        if name in results
    }
    if "lifelong" in results:
        out["lifelong"] = {k: v for k, v in results["lifelong"].items() if k != "variants"}
        out["lifelong"]["variants"] = results["lifelong"]["variants"]
    out.update(base=results["base"], seconds=results["seconds"], grids=results["grids"])
    return out
