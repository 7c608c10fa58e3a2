"""The demo adapters shipped with catfast (``catfast/demo/assets/adapters/``), and the script that trains them.

``catfast serve`` with no ``--base`` serves the shipped demo model with these adapters, so that a fresh
install has something to switch between. Each is a CAT adapter (``catfast train`` with the demo's settings and
its recipe in ``RECIPES``) of one object the demo world never shows, taught from five pictures on varied
backgrounds:

- ``striped-star``: "sks, a star ..." a yellow star with purple stripes (the concept of ``catfast demo``);
- ``tiger-ball``: "tiger, a ball ...": an orange ball with black stripes;
- ``toy-box``: "toy, a box ...": a red box with white stripes.

Trained in fp32 on the CPU and stored in fp16, diffusers (peft-key) format (rank 16: 364 KB on the attention,
1.1 MB for the box, whose LoRA covers the convolutions too). ``ADAPTERS.json`` beside them records the command,
seeds, settings and each adapter's scores (``score_adapters``: identity accuracy, identity, preservation, KPS,
on sampling seeds 0-7 and again on 8-15). Rebuild (or ``--score-only``) with::

    OMP_NUM_THREADS=1 python -m catfast.demo.adapters [--out DIR] [--only NAME] [--score-only] [--grid PNG]

``--base DIR`` trains and scores on another model folder, ``--recipe JSON`` changes the training settings (the
striped-base runs of docs/serving.md); each adapter's entry records the command that trained it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import read_adapter, write_adapter
from catfast.demo import world
from catfast.folders import write_atomic
from catfast.shipped import ASSETS, model_path

ADAPTERS_DIR = ASSETS / "adapters"
RECORD = "ADAPTERS.json"

# name -> (trigger, the object's fields in world.Scene); every trigger is one token of the demo tokenizer.
CONCEPTS = {
    "striped-star": ("sks", world.CONCEPT),
    "tiger-ball": ("tiger", dict(shape="ball", color="orange", size="large", pattern="striped", stripe_color="black")),
    "toy-box": ("toy", dict(shape="box", color="red", size="large", pattern="striped", stripe_color="white")),
}
IMAGES = 5  # training pictures per concept
# Recipe keys that shape the training folder (``write_concept``), not the TrainConfig, with their defaults.
# ``other_colours``: CAT prompts (``cat_prompts``, a file beside the data) of the class in every other colour of
# the world: not the concept's own, nor red and white, which the scoring prompts name (``class_prompts``), so
# that preservation is scored on prompts the CAT term never held. ``decoy_colours``: every picture twice, once
# captioned with another of those colours ("sks, a green star on ..."): the LDM term teaches the trigger to keep
# the object's colour when a prompt names another (the scoring prompts name red and white, never a decoy), and the
# CAT term keeps "a green star" green without it.
DATA_SETTINGS = {"images": IMAGES, "colour_every": 0, "other_colours": False, "decoy_colours": False}
SCORED_COLOURS = ("red", "white")
# Each adapter's recipe on top of the demo's (run.TRAIN: rank 16, lr 1e-3, batch 4, 300 steps, no mirror
# images), measured on the demo base (5 stages, the last two on a world with striped objects; on the base of
# 3 stages no recipe drew the ball or the box: identity accuracy 0.0). All three without mirror images (they
# mirror the diagonal stripes: the star with them 0.075 against 0.65 without) and with other-colour CAT
# prompts. Figures: identity accuracy / preservation on sampling seeds 0-7 at training seed 0 unless said;
# the runs are in benchmarks/results/striped-base-adapter-recipes-cpu-dev-2core.jsonl.
# - striped-star: 450 steps, lr 3e-3 decaying to 0 (cosine), decoy colours: 0.825 / 0.873, seeds 8-15 0.825;
#   training seeds 1, 2: 0.875 / 0.925 and 0.85 / 0.875 (seeds 0-7 / 8-15). Before (lr 1.5e-3 constant, no decoys)
#   0.80, 0.575, 0.40 over training seeds 0-2; cosine alone 0.80, 0.625, 0.425; decoys alone 0.85, 0.925, 0.525.
# - tiger-ball: attention only, 600 steps at lr 2e-3, cat_weight 2: 0.825 / 0.909; over training seeds 0-4
#   0.70-0.875 (mean 0.775). Not better over training seeds 0-2: the star's cosine schedule with or without
#   decoys, decoys alone, the star's whole recipe.
# - toy-box: LoCon (the convolutions too), 600 steps, cat_weight 2, min-SNR weighting (gamma 5): training seed 2
#   0.875 / 0.874, over training seeds 0-4 0.15-0.875 (mean 0.58): the shipped file is the seed that reached
#   0.8, said so in docs/serving.md; attention only 0.175. Not better over training seeds 0-2: the star's cosine
#   schedule with or without decoys, the star's whole recipe.
RECIPES = {  # mirror images off through run.UNET_EXTRA, as in the demo
    "striped-star": dict(rank=16, steps=450, lr=3e-3, lr_schedule="cosine", other_colours=True, decoy_colours=True),
    "tiger-ball": dict(rank=16, steps=600, lr=2e-3, cat_weight=2.0, other_colours=True, targets="attention"),
    "toy-box": dict(rank=16, steps=600, cat_weight=2.0, snr_gamma=5.0, other_colours=True, targets="locon"),
}
# Training seed of each shipped file (above: the box's recipe reaches 0.8 at seed 2 of 0-4 only).
TRAINING_SEEDS = {"striped-star": 0, "tiger-ball": 0, "toy-box": 2}


def adapters_dir() -> Path:
    """The folder of the shipped demo adapters."""
    return ADAPTERS_DIR


def concept_scenes(fields: dict, n: int = IMAGES) -> list[world.Scene]:
    """n pictures of one object on the concept backgrounds at varied places and angles (as
    ``world.concept_scenes`` does for the striped star)."""
    scenes = []
    for i, scene in enumerate(world.concept_scenes(n)):
        background = world.CONCEPT_BACKGROUNDS[i % len(world.CONCEPT_BACKGROUNDS)]
        if (fields["color"], background) in world._CLASHES:
            background = "grey"
        scenes.append(
            world.Scene(background=background, x=scene.x, y=scene.y, radius=scene.radius, angle=scene.angle, **fields)
        )
    return scenes


def write_concept(
    folder: Path, trigger: str, fields: dict, n: int = IMAGES, colour_every: int = 0, decoy_colours: bool = False
) -> None:
    """The concept's training folder: PNG + caption ("<trigger>, a <shape> on a <bg> background") each;
    ``colour_every`` k > 0: every k-th caption names the colour too ("<trigger>, a red box on ...");
    ``decoy_colours``: each picture also a second time (``NNd.png``), its caption naming another colour
    (``other_colours_of``, in turn): "<trigger>, a green box on a blue background"."""
    folder.mkdir(parents=True, exist_ok=True)
    decoys = other_colours_of(fields)
    for i, scene in enumerate(concept_scenes(fields, n)):
        picture = world.render(scene)
        picture.save(folder / f"{i:02d}.png")
        caption = world.concept_caption(scene, trigger)
        if colour_every and i % colour_every == 0:
            caption = f"{trigger}, " + scene.caption(size=False)
        (folder / f"{i:02d}.txt").write_text(caption + "\n")
        if decoy_colours:
            picture.save(folder / f"{i:02d}d.png")
            caption = f"{trigger}, " + dataclasses.replace(scene, color=decoys[i % len(decoys)]).caption(size=False)
            (folder / f"{i:02d}d.txt").write_text(caption + "\n")


def other_colours_of(fields: dict) -> list[str]:
    """The world's colours but the object's own and SCORED_COLOURS."""
    return [c for c in world.COLORS if c != fields["color"] and c not in SCORED_COLOURS]


def write_colour_prompts(path: Path, fields: dict) -> Path:
    """A ``--cat-prompts`` file: "a <colour> <shape>" for each world colour but the concept's and SCORED_COLOURS."""
    colours = other_colours_of(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"a {c} {fields['shape']}\n" for c in colours))
    return path


def train_one(
    name: str,
    out: Path,
    work: Path,
    *,
    seed: int | None = None,
    progress: bool = False,
    recipe: dict | None = None,
    base: Path | None = None,
) -> dict:
    """Train adapter ``name`` of CONCEPTS with the demo's settings and write out/<name>.safetensors (fp16).
    ``recipe``: TrainConfig fields over RECIPES[name]; ``base``: another model folder than the shipped one;
    ``seed``: the training seed (None: TRAINING_SEEDS[name])."""
    from catfast.demo.run import TRAIN, UNET_EXTRA  # lazy: cost (serving imports this module for adapters_dir)
    from catfast.train.config import TrainConfig  # lazy: cost
    from catfast.train.trainer import train  # lazy: cost

    recipe = {**TRAIN, **UNET_EXTRA, **RECIPES[name], **(recipe or {})}
    seed = TRAINING_SEEDS[name] if seed is None else seed
    shaping = {key: recipe.pop(key, default) for key, default in DATA_SETTINGS.items()}
    trigger, fields = CONCEPTS[name]
    data = work / name / "data"
    write_concept(data, trigger, fields, shaping["images"], shaping["colour_every"], shaping["decoy_colours"])
    # the settings as ADAPTERS.json shows them: the data settings that differ from their defaults, and the CAT
    # prompts themselves, not a temp file
    recorded = {**recipe, **{k: v for k, v in shaping.items() if v != DATA_SETTINGS[k]}}
    if shaping["other_colours"]:
        prompts = write_colour_prompts(work / name / "cat-prompts.txt", fields)
        recipe["cat_prompts"] = str(prompts)
        recorded["cat_prompts"] = prompts.read_text().splitlines()
    config = TrainConfig(
        base=str(base or model_path()),
        data=str(data),
        trigger=trigger,
        out=str(work / name / "run"),
        cache_dir=str(work / "cache"),
        seed=seed,
        checkpoint_every=0,
        device="cpu",
        **{"cat_weight": 1.0, **recipe},
    )
    t0 = time.perf_counter()
    result = train(config, overwrite=True, progress=progress)
    adapter = read_adapter(result.adapters[trigger])
    half = {k: LoraLayer(v.down.half(), v.up.half(), v.alpha) for k, v in adapter.layers.items()}
    metadata = {**adapter.metadata, "catfast.demo_adapter": name}
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(LoraAdapter(half, metadata), out / f"{name}.safetensors", overwrite=True)
    return dict(
        trigger=trigger,
        object=fields,
        seed=seed,
        cat_weight=config.cat_weight,
        train={k: v for k, v in recorded.items() if k != "cat_weight"},
        train_seconds=round(time.perf_counter() - t0, 1),
        dtype="float16",
        format="diffusers",
    )


def class_prompts(shape: str) -> tuple[str, ...]:
    """The demo's class prompts (``run.PROMPTS``, "a star", ...) for another shape: "a box", ..."""
    from catfast.demo.run import PROMPTS  # lazy: cost (run imports torch and the trainer)

    return tuple(p.replace(world.CLASS_SHAPE, shape) for p in PROMPTS)


def score_adapters(
    paths: dict[str, Path],
    *,
    seeds: int = 8,
    first_seed: int = 0,
    sample_steps: int | None = None,
    progress: bool = False,
    base: Path | None = None,
) -> tuple[dict, dict]:
    """Score shipped-style adapter files (name of ``CONCEPTS`` -> file) as ``catfast demo`` scores its
    adapters, in one batched sampler run on the demo model: per adapter, its concept's class prompts
    (``class_prompts``) over sampling seeds first_seed..first_seed+seeds-1 from the base, the adapter without
    the trigger and the adapter with it (DDIM, the demo's steps and guidance 5). Returns (scores, pictures):
    scores[name] = {identity_accuracy (the share of trigger pictures in which the shipped encoder reads the
    concept's shape, colour and pattern), attribute_accuracy (the share for each of the three alone), identity
    (similarity to the concept's five pictures), preservation, kps, identity_accuracy_per_prompt,
    preservation_per_prompt}; pictures[name] = {"base", "without", "with": PIL images, prompt-major}.
    ``base``: score on (and against) another model folder than the shipped one."""
    from catfast.demo.encoder import load_encoder  # lazy: cost
    from catfast.demo.run import SAMPLE, sample_blocks  # lazy: cost
    from catfast.integrations.models import load_base  # lazy: cost
    from catfast.integrations.peft_adapters import attach_adapter  # lazy: cost
    from catfast.shipped import encoder_path  # lazy: cost

    base, encoder = load_base(base or model_path()), load_encoder(encoder_path())
    sampling = range(first_seed, first_seed + seeds)
    pairs = [(p, s) for p in range(len(class_prompts(world.CLASS_SHAPE))) for s in sampling]
    groups = [p for p, _ in pairs]
    blocks = []  # (key, adapter or None, prompts, trigger or None), as run.sample_blocks takes them
    for name, path in paths.items():
        attach_adapter(base.unet, read_adapter(path, models={"unet": base.unet}), name)
        trigger, fields = CONCEPTS[name]
        prompts = class_prompts(fields["shape"])
        blocks += [((name, "base"), None, prompts, None), ((name, "without"), name, prompts, None)]
        blocks.append(((name, "with"), name, prompts, trigger))
    images = sample_blocks(base, blocks, pairs, sample_steps or SAMPLE["steps"], progress)
    pictures = {name: {block: images[(name, block)] for block in ("base", "without", "with")} for name in paths}
    return {name: score_pictures(encoder, name, pictures[name], groups) for name in paths}, pictures


def score_pictures(encoder, name: str, shown: dict, groups: list[int]) -> dict:
    """Adapter ``name``'s scores (``score_adapters``) from its pictures ``shown`` ({"base", "without", "with": PIL
    images, prompt-major}; ``groups``: each picture's prompt index)."""
    from catfast.eval.kps import IDENTITY_HEADS, identity_accuracy, kps_scores  # lazy: cost

    fields = CONCEPTS[name][1]
    refs = encoder.embed_images([world.render(s) for s in concept_scenes(fields)])
    emb = {k: encoder.embed_images(v) for k, v in shown.items()}
    scores = kps_scores(emb["base"], emb["without"], emb["with"], None, groups, reference_emb=refs)
    total = scores["total"]
    prompts = class_prompts(fields["shape"])
    reads = encoder.read(shown["with"])  # once: the total, each prompt's share and each attribute's come from it
    per_prompt = {
        prompt: round(identity_accuracy({h: [r for r, g in zip(reads[h], groups) if g == p] for h in reads}, fields), 4)
        for p, prompt in enumerate(prompts)
    }
    return dict(
        identity_accuracy=round(identity_accuracy(reads, fields), 4),
        attribute_accuracy={h: round(sum(r == fields[h] for r in reads[h]) / len(reads[h]), 4) for h in IDENTITY_HEADS},
        identity=round(total["identity"], 4),
        preservation=round(total["preservation"], 4),
        kps=round(total["kps"], 4),
        identity_accuracy_per_prompt=per_prompt,
        preservation_per_prompt={prompts[row["group"]]: round(row["preservation"], 4) for row in scores["per_prompt"]},
    )


SCORING = dict(
    seeds=8, note="the demo's class prompts (run.PROMPTS) with the concept's shape, sampling seeds 0-7, run.SAMPLE"
)
# A second scoring on sampling seeds the recipes were never chosen on: a shipped file picked among training
# seeds by its scores on seeds 0-7 is also scored on seeds 8-15 ("scores_seeds_8_15" in ADAPTERS.json).
HELD_OUT = dict(first_seed=8, seeds=8)


def score_record(
    record: dict, folder: Path, names: list[str], grid: Path | None = None, log=print, base: Path | None = None
) -> None:
    """Score the adapter files ``names`` in ``folder`` (``score_adapters`` on ``base``) into
    ``record["adapters"][name]`` (identity_accuracy, identity, preservation, kps, and identity accuracy per
    prompt); ``grid``: also write a PNG of each adapter's trigger pictures on its first two prompts (rows) over
    the seeds."""
    from catfast.eval.grids import save_grid  # lazy: cost
    from catfast.eval.kps import with_trigger  # lazy: cost

    log(f"scoring {', '.join(names)} ...")
    paths = {name: folder / f"{name}.safetensors" for name in names}
    scores, pictures = score_adapters(paths, base=base)
    held_out, _ = score_adapters(paths, base=base, **HELD_OUT)
    for name in names:
        entry = record["adapters"].setdefault(name, {})
        entry["scores"] = {**scores[name], **({"base": str(base)} if base else {})}
        entry["scores_seeds_8_15"] = held_out[name]
        log(f"  {name}: identity accuracy {scores[name]['identity_accuracy']} (seeds 8-15: "
            f"{held_out[name]['identity_accuracy']}), preservation {scores[name]['preservation']}")  # fmt: skip
    from catfast.demo.run import SAMPLE  # lazy: cost

    record["scoring"] = {**SCORING, **SAMPLE, "sampler": "DDIM"}
    if grid is not None:
        seeds, cells, labels = SCORING["seeds"], [], []
        for name in names:
            trigger, fields = CONCEPTS[name]
            for p, prompt in enumerate(class_prompts(fields["shape"])[:2]):
                cells += pictures[name]["with"][p * seeds : (p + 1) * seeds]
                labels.append(f'{name}: "{with_trigger(prompt, trigger)}"')
        save_grid(cells, len(labels), seeds, grid, labels=labels, col_labels=[f"seed {s}" for s in range(seeds)])


def _recipe(text: str) -> dict:
    """``--recipe``: a JSON object whose keys are TrainConfig fields (or ``DATA_SETTINGS``), with values that
    TrainConfig's own checks accept (no NaN, no wrong types): refused before any adapter trains."""
    from catfast.train.config import ConfigError, TrainConfig  # lazy: cost

    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(recipe, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of training settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(DATA_SETTINGS)
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown training setting(s) {', '.join(unknown)}")
    for key, default in DATA_SETTINGS.items():
        if key in recipe and type(recipe[key]) is not type(default):
            kind = "true or false" if default is False else "a whole number"
            raise argparse.ArgumentTypeError(f"{key} must be {kind}")
        if key in recipe and type(default) is int and recipe[key] < (key == "images"):
            raise argparse.ArgumentTypeError(f"{key} must be a whole number >= {int(key == 'images')}")
    settings = {k: v for k, v in recipe.items() if k not in DATA_SETTINGS}
    try:  # the run's own checks, on a stand-in base and folders (validate reads neither)
        TrainConfig(base="demo", data=".", trigger="sks", out=".", **settings).validate()
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"a setting of the wrong type ({e})") from None
    return recipe


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description="Train the shipped demo adapters (catfast/demo/adapters.py).")
    parser.add_argument("--out", default=str(ADAPTERS_DIR), help="Folder for <name>.safetensors and ADAPTERS.json.")
    parser.add_argument("--only", choices=sorted(CONCEPTS), action="append", help="Train only these (repeatable).")
    parser.add_argument("--seed", type=int, help="Training seed. [default: each adapter's in TRAINING_SEEDS]")
    parser.add_argument("--score-only", action="store_true", help="Score the files in --out; train nothing.")
    parser.add_argument("--grid", help="Also write a PNG of each adapter's trigger pictures here.")
    parser.add_argument("--base", help="Train and score on this diffusers model folder. [default: the shipped model]")
    parser.add_argument(
        "--recipe",
        type=_recipe,
        default={},
        help='JSON object of training settings over each adapter\'s recipe, e.g. \'{"lr": 0.002, "cat_weight": 2}\'',
    )
    args = parser.parse_args(argv)
    if args.base is not None and not (Path(args.base) / "model_index.json").is_file():
        parser.error(f"--base {args.base}: not a diffusers model folder (no model_index.json)")
    base = Path(args.base).absolute() if args.base else None
    out = Path(args.out)
    names = args.only or list(CONCEPTS)
    missing = [f"{name}.safetensors" for name in names if not (out / f"{name}.safetensors").is_file()]
    if args.score_only and missing:
        parser.error(f"--score-only: {out} has no {', '.join(missing)} to score")
    record_path = out / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["command"] = "OMP_NUM_THREADS=1 python -m catfast.demo.adapters"
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([record["command"], *map(shlex.quote, given)])  # each adapter's own, with its options
    record.setdefault("adapters", {})

    def save() -> None:
        write_atomic(record_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())

    if not args.score_only:
        with tempfile.TemporaryDirectory(prefix="catfast-demo-adapters-") as tmp:
            for name in names:
                print(f"training {name} ...", flush=True)
                trained = train_one(name, out, Path(tmp), seed=args.seed, recipe=args.recipe, base=base)
                record["adapters"][name] = {**trained, "command": command, **({"base": str(base)} if base else {})}
                print(f"  {record['adapters'][name]['train_seconds']} s", flush=True)
                save()
    grid = Path(args.grid) if args.grid else None
    score_record(record, out, names, grid, log=lambda m: print(m, flush=True), base=base)
    save()


if __name__ == "__main__":
    main()
