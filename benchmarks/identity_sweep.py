"""Issue 14 §5: why are the demo's trigger rows textures, not the striped star? CAT adapters of the demo
concept trained with other settings (rank, lr, steps, captions, timestep weighting), each sampled and scored
as ``catfast demo --compare`` scores them, at several guidance scales.

Per variant and guidance: preservation, identity, KPS, class diversity (``catfast.eval.kps.kps_scores``, the demo's
attribute encoder), and ``concept_rate``: the share of trigger pictures the encoder reads as a yellow
striped star (argmax of its shape, color and pattern heads), a stricter "recognisably the concept" test
than identity (a cosine, which partial matches also raise). Calibration rows: the five concept pictures
themselves, their VAE round trips, and the base on "a large yellow star ..." (the concept without stripes).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/identity_sweep.py --out /tmp/sweep \\
        --variant demo --variant lr3e-4:lr=3e-4 --guidance 5 --guidance 2 --json-out results.jsonl

The rows of docs/retention.md were measured when the demo's TRAIN had rank 4: its "demo" variant is
``demo4:rank=4`` now that the demo trains rank 16.
A variant is NAME[:key=value,...] over ``catfast.demo.run.TRAIN`` and TrainConfig fields, plus
``captions=yellow``: train on "sks, a large yellow star on a grey background" (the words the base knows;
the world's captions have no pattern word, the base never saw stripes). Trigger prompts stay the demo's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: str) -> tuple[str, dict]:
    """ "name:key=value,key=value" -> (name, overrides)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = _value(value.strip())
    return name, overrides


def concept_rate(encoder, images) -> float:
    """Share of pictures read as shape star, color yellow, pattern striped (the concept's attributes)."""
    from catfast.demo.encoder import HEADS

    probs = encoder.predict(images)
    want = {"shape": "star", "color": "yellow", "pattern": "striped"}
    ok = None
    for head, value in want.items():
        hit = probs[head].argmax(1) == HEADS[head].index(value)
        ok = hit if ok is None else ok & hit
    return float(ok.float().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--seeds", type=int, default=8, help="sampling seeds per prompt")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--guidance", action="append", type=float, default=None)
    parser.add_argument("--calibrate", action="store_true", help="also score the calibration rows")
    parser.add_argument("--json-out", help="append one JSON line per variant and guidance here")
    args = parser.parse_args(argv)
    guidances = args.guidance or [5.0]

    import torch

    from catfast.adapters.formats import read_adapter
    from catfast.demo import world
    from catfast.demo.compare import _config
    from catfast.demo.encoder import load_encoder
    from catfast.demo.run import PROMPTS, SAMPLE, diversity, write_concept
    from catfast.eval.kps import harmonic_mean, image_similarity, kps_scores, with_trigger
    from catfast.eval.sampler import sample_images
    from catfast.integrations.models import load_base
    from catfast.integrations.peft_adapters import attach_adapter
    from catfast.shipped import encoder_path, model_path
    from catfast.train.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, encoder = model_path(None), load_encoder(encoder_path(None))
    references = write_concept(out / "concept")
    ref = encoder.embed_images(references)
    pairs = [(p, s) for p in range(len(PROMPTS)) for s in range(args.seeds)]
    groups = [p for p, _ in pairs]
    lines = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        lines.append(row)

    if args.calibrate:
        import numpy as np

        from catfast.eval.sampler import decode_latents

        base = load_base(model)
        x = torch.stack(
            [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for im in references]
        )
        with torch.no_grad():
            lat = base.vae.encode(x).latent_dist.mean * base.vae.config.scaling_factor
        vae_images = decode_latents(base, lat)
        yellow = [p.replace("a star", "a large yellow star") for p in PROMPTS]
        base_yellow = sample_images(
            base,
            [yellow[p] for p, _ in pairs],
            adapters=[None] * len(pairs),
            seeds=[s for _, s in pairs],
            **SAMPLE,
        )
        for name, images in (
            ("concept pictures", references),
            ("VAE round trip", vae_images),
            ("base: a large yellow star", base_yellow),
        ):
            emb = encoder.embed_images(images)
            ident = harmonic_mean(image_similarity(emb, ref).mean(dim=1).tolist())
            emit(
                {
                    "calibration": name,
                    "identity": round(ident, 4),
                    "concept_rate": round(concept_rate(encoder, images), 4),
                }
            )

    for spec in args.variant:
        name, overrides = parse_variant(spec)
        steps = int(overrides.pop("steps", 300))
        data = out / "concept"
        if overrides.pop("captions", None) == "yellow":  # name what the base knows: colour and size
            data = out / "concept-yellow"
            write_concept(data)
            for txt in data.glob("*.txt"):
                txt.write_text(txt.read_text().replace("a star", "a large yellow star"))
        t0 = time.perf_counter()
        result = train(
            _config(name, model, data, world.TRIGGER, out, args.seed, steps, **overrides),
            overwrite=True,
            progress=False,
        )
        train_s = time.perf_counter() - t0
        base = load_base(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            attach_adapter(base.unet, read_adapter(result.adapters[world.TRIGGER], models={"unet": base.unet}), "a")
        for g in guidances:
            rows = [(None, PROMPTS[p], s) for p, s in pairs]
            rows += [("a", PROMPTS[p], s) for p, s in pairs]
            rows += [("a", with_trigger(PROMPTS[p], world.TRIGGER), s) for p, s in pairs]
            images = sample_images(
                base,
                [r[1] for r in rows],
                adapters=[r[0] for r in rows],
                seeds=[r[2] for r in rows],
                steps=SAMPLE["steps"],
                guidance=g,
            )
            m = len(pairs)
            emb = encoder.embed_images(images)
            kps = kps_scores(emb[:m], emb[m : 2 * m], emb[2 * m :], None, groups, reference_emb=ref)
            total = kps["total"]
            emit(
                dict(
                    variant=name,
                    overrides={**overrides, "steps": steps},
                    seed=args.seed,
                    guidance=g,
                    preservation=round(total["preservation"], 4),
                    identity=round(total["identity"], 4),
                    kps=round(total["kps"], 4),
                    diversity=round(diversity(emb[m : 2 * m], groups), 4),
                    concept_rate=round(concept_rate(encoder, images[2 * m :]), 4),
                    train_seconds=round(train_s, 1),
                    per_prompt={PROMPTS[r["group"]]: round(r["preservation"], 4) for r in kps["per_prompt"]},
                    threads=torch.get_num_threads(),
                    loadavg=[round(x, 2) for x in os.getloadavg()],
                )
            )
            from catfast.eval.grids import save_grid

            cells = [im.resize((80, 80), 0) for im in images[2 * m : 2 * m + args.seeds]]
            save_grid(cells, 1, args.seeds, out / f"trigger-{name}-g{g:g}.png", labels=[f"{name} g{g:g}"])
    if args.json_out:
        with open(args.json_out, "a") as f:
            for row in lines:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
