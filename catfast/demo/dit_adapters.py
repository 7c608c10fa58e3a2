"""The three demo adapters of ``catfast.demo.adapters`` (striped-star, tiger-ball, toy-box) trained on the DiT demo
base (catfast/demo/assets/dit_model), shipped in catfast/demo/assets/dit_adapters/.

Each is a CAT adapter (``catfast train``: the demo's settings, ``DIT_RECIPES``' rank, ``--resolution 32``)
of one object the world never shows, from the same five pictures as the UNet's; stored in fp16 with the DiT
trainer's keys and metadata (``transformer.`` keys, diffusers' ``lora_adapter_metadata``), so
``FluxPipeline.load_lora_weights`` and ``catfast serve`` load them. ADAPTERS.json records the command, settings and
scores (``adapters.score_pictures`` on pictures from the flow sampler: the concept's class prompts, sampling seeds
0-7, 20 Euler steps, no guidance). ``catfast serve --base demo-dit`` serves the DiT demo base with them (32 px).

Rebuild with ``OMP_NUM_THREADS=1 python -m catfast.demo.dit_adapters [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from catfast.demo import world
from catfast.demo.adapters import CONCEPTS, RECORD, class_prompts, score_pictures, write_concept
from catfast.folders import write_atomic
from catfast.shipped import dit_adapters_path, dit_model_path, encoder_path

DIT_ADAPTERS_DIR = dit_adapters_path()
SEEDS = 8  # sampling seeds of the scores
# Each adapter's recipe on top of the demo's (run.TRAIN): the UNet adapters' ranks of their time (16, 4, 4); not
# the UNet toy-box's LoCon (a DiT has no convolutions to target) nor its flips (docs/retention.md: without
# flips, rank 16 and 1500 steps, tiger-ball reads 0.425 here instead of 0.0, at preservation 0.881 against this
# rank-4 file's 0.904).
SEED = 0  # training seed of every DiT adapter
DIT_RECIPES = {"striped-star": dict(rank=16), "tiger-ball": dict(rank=4), "toy-box": dict(rank=4)}


def train_one(name: str, out: Path, work: Path, *, seed: int = SEED) -> dict:
    """Train adapter ``name`` of ``CONCEPTS`` on the DiT demo base; write out/<name>.safetensors (fp16)."""
    from catfast.demo.run import TRAIN  # lazy: cost
    from catfast.train.config import TrainConfig  # lazy: cost
    from catfast.train.trainer import train  # lazy: cost

    trigger, fields = CONCEPTS[name]
    recipe = {**TRAIN, **DIT_RECIPES[name]}
    write_concept(work / name / "data", trigger, fields)
    config = TrainConfig(base=str(dit_model_path()), data=str(work / name / "data"), trigger=trigger,
                         out=str(work / name / "run"), cache_dir=str(work / "cache"), seed=seed, checkpoint_every=0,
                         device="cpu", resolution=world.SIDE, cat_weight=1.0, **recipe)  # fmt: skip
    t0 = time.perf_counter()
    path = train(config, overwrite=True, progress=False).adapters[trigger]
    with safe_open(str(path), "pt") as f:
        metadata = {**(f.metadata() or {}), "catfast.demo_adapter": name}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in load_file(path).items()}, out / f"{name}.safetensors", metadata=metadata)
    return dict(trigger=trigger, object=fields, seed=seed, cat_weight=1.0, train={**recipe, "resolution": world.SIDE},
                train_seconds=round(time.perf_counter() - t0, 1), dtype="float16", format="diffusers")  # fmt: skip


def score(folder: Path, names: list[str]) -> dict:
    """name -> scores (``adapters.score_pictures``) of the adapter files in ``folder``, one flow-sampler run."""
    from catfast.demo import dit_run
    from catfast.demo.encoder import load_encoder

    pairs = [(p, s) for p in range(len(class_prompts(world.CLASS_SHAPE))) for s in range(SEEDS)]
    rows, keys = [], []
    for name in names:
        trigger, fields = CONCEPTS[name]
        prompts = class_prompts(fields["shape"])
        for block, adapter, lead in (("base", None, ""), ("without", name, ""), ("with", name, f"{trigger}, ")):
            rows += [(adapter, lead + prompts[p], s) for p, s in pairs]
            keys.append((name, block))
    adapters = {name: folder / f"{name}.safetensors" for name in names}
    images = dit_run.sample_blocks(dit_model_path(), adapters, rows, dit_run.SAMPLE["steps"], False)
    m, encoder = len(pairs), load_encoder(encoder_path())
    shown = {key: images[i * m : (i + 1) * m] for i, key in enumerate(keys)}
    groups = [p for p, _ in pairs]
    blocks = ("base", "without", "with")
    return {name: score_pictures(encoder, name, {b: shown[(name, b)] for b in blocks}, groups) for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shipped DiT demo adapters (catfast/demo/dit_adapters.py).")
    parser.add_argument("--out", default=str(DIT_ADAPTERS_DIR), help="Folder for <name>.safetensors and ADAPTERS.json.")
    parser.add_argument("--score-only", action="store_true", help="Score the files in --out; train nothing.")
    args = parser.parse_args(argv)
    out, names = Path(args.out), list(CONCEPTS)
    record = {"command": "OMP_NUM_THREADS=1 python -m catfast.demo.dit_adapters", "adapters": {}}
    if args.score_only:
        record = json.loads((out / RECORD).read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="catfast-dit-adapters-") as tmp:
            for name in names:
                print(f"training {name} ...", flush=True)
                record["adapters"][name] = train_one(name, out, Path(tmp))
    print("scoring ...", flush=True)
    for name, scores in score(out, names).items():
        record["adapters"][name]["scores"] = scores
        print(f"  {name}: identity accuracy {scores['identity_accuracy']}, preservation {scores['preservation']}")
    from catfast.demo.dit_run import SAMPLE

    record["scoring"] = dict(seeds=SEEDS, **SAMPLE, sampler="flow-matching Euler (catfast.eval.flow_sampler)")
    write_atomic(out / RECORD, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


if __name__ == "__main__":
    main()
