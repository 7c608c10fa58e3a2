"""The demo adapters shipped with catfast (``catfast/demo/assets/adapters/``), and the script that trains them.

``catfast serve`` with no ``--base`` serves the shipped demo model with these adapters, so that a fresh
install has something to switch between. Each is a CAT adapter (rank 4, ``catfast train`` with the demo's
other settings) of one object the demo world never shows, taught from five pictures on varied backgrounds:

- ``striped-star``: "sks, a star ..." a yellow star with purple stripes (the concept of ``catfast demo``);
- ``tiger-ball``: "tiger, a ball ...": an orange ball with black stripes;
- ``toy-box``: "toy, a box ...": a red box with white stripes.

Trained in fp32 on the CPU and stored in fp16, diffusers (peft-key) format, ~104 KB each. ``ADAPTERS.json``
beside them records the command, seeds and settings. Rebuild with::

    OMP_NUM_THREADS=1 python -m catfast.demo.adapters [--out DIR] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import read_adapter, write_adapter
from catfast.demo import world
from catfast.demo.shipped import ASSETS, model_path
from catfast.folders import write_atomic

ADAPTERS_DIR = ASSETS / "adapters"
RECORD = "ADAPTERS.json"

# name -> (trigger, the object's fields in world.Scene); every trigger is one token of the demo tokenizer.
CONCEPTS = {
    "striped-star": ("sks", world.CONCEPT),
    "tiger-ball": ("tiger", dict(shape="ball", color="orange", size="large", pattern="striped", stripe_color="black")),
    "toy-box": ("toy", dict(shape="box", color="red", size="large", pattern="striped", stripe_color="white")),
}
SEED = 0  # training seed of every adapter
IMAGES = 5  # training pictures per concept
# the shipped files were trained at rank 4 (the demo's rank then); they stay small (tests/test_demo_adapters.py)
# and serve the serving demo, where identity at guidance 5 is not what they show
SHIPPED_RANK = 4


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


def write_concept(folder: Path, trigger: str, fields: dict) -> None:
    """The concept's training folder: PNG + caption ("<trigger>, a <shape> on a <bg> background") each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(concept_scenes(fields)):
        world.render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(world.concept_caption(scene, trigger) + "\n")


def train_one(name: str, out: Path, work: Path, *, seed: int = SEED, progress: bool = False) -> dict:
    """Train adapter ``name`` of CONCEPTS with the demo's settings and write out/<name>.safetensors (fp16)."""
    from catfast.demo.run import TRAIN as DEMO_TRAIN  # lazy: cost (serving imports this module for adapters_dir)
    from catfast.train.config import TrainConfig  # lazy: cost
    from catfast.train.trainer import train  # lazy: cost

    recipe = {**DEMO_TRAIN, "rank": SHIPPED_RANK}
    trigger, fields = CONCEPTS[name]
    data = work / name / "data"
    write_concept(data, trigger, fields)
    config = TrainConfig(
        base=str(model_path()),
        data=str(data),
        trigger=trigger,
        out=str(work / name / "run"),
        cache_dir=str(work / "cache"),
        cat_weight=1.0,
        seed=seed,
        checkpoint_every=0,
        device="cpu",
        **recipe,
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
        cat_weight=1.0,
        train=recipe,
        train_seconds=round(time.perf_counter() - t0, 1),
        dtype="float16",
        format="diffusers",
    )


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description="Train the shipped demo adapters (catfast/demo/adapters.py).")
    parser.add_argument("--out", default=str(ADAPTERS_DIR), help="Folder for <name>.safetensors and ADAPTERS.json.")
    parser.add_argument("--only", choices=sorted(CONCEPTS), action="append", help="Train only these (repeatable).")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    out = Path(args.out)
    record_path = out / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["command"] = "OMP_NUM_THREADS=1 python -m catfast.demo.adapters"
    record.setdefault("adapters", {})
    with tempfile.TemporaryDirectory(prefix="catfast-demo-adapters-") as tmp:
        for name in args.only or list(CONCEPTS):
            print(f"training {name} ...", flush=True)
            record["adapters"][name] = train_one(name, out, Path(tmp), seed=args.seed)
            print(f"  {record['adapters'][name]['train_seconds']} s", flush=True)
            write_atomic(record_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


if __name__ == "__main__":
    main()
