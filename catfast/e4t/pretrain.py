"""E4T domain pre-training on the demo world: the concept encoder and the domain weight offsets.

    OMP_NUM_THREADS=1 python -m catfast.e4t.pretrain --out DIR [--steps N] [--seed S]

On the shipped demo model (frozen), trains jointly, on the world's training concepts (``concepts.split``;
the held-out ones are never drawn):
- the ``ConceptEncoder`` (``model.py``) that maps one picture of a concept to its word embedding
  ``v* = v_class + E(x)``, x being another picture of the same concept than the one denoised;
- the domain offsets: a rank-``DOMAIN_RANK`` LoRA on the UNet's attention projections.
Each batch holds ``concept_rows`` concept rows, captioned "sks, a <shape>" or "sks, a <shape> on a <bg>
background" with v* in place of "sks", and ``prior_rows`` rows of plain world pictures with their own
captions (10% empty, for guidance), which keep the offsets from changing what class prompts draw.
Loss: the diffusion MSE (epsilon) + ``embed_weight`` x the embedding penalty + ``offset_weight`` x the
offset penalty (``losses.py``). AdamW, warmup + cosine decay, gradients clipped at 1.

Writes DIR/encoder.safetensors, DIR/domain.safetensors (fp16 diffusers-format LoRA) and DIR/pretrain.json
(the command, settings, held-out concepts, seconds), then DIR/MANIFEST.json (size + sha256 of each).
Everything is seeded: the same command gives the same files on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from catfast.demo import world
from catfast.e4t import concepts as cc
from catfast.e4t.model import DOMAIN_FILE, DOMAIN_RANK, ENCODER_FILE, RECORD_FILE, TARGETS, ConceptEncoder

TOKEN = "sks"
VIEWS = 3  # pictures per training concept in the pool
SETTINGS = dict(
    steps=1200,
    concept_rows=12,
    prior_rows=4,
    lr=1e-3,
    trunk_lr=1e-4,
    embed_weight=0.01,
    offset_weight=0.01,
    prior_images=2000,
    warmup=50,
    pool_concepts=None,  # None: every training concept; a number: the first n (for tests)
)


def concept_caption(shape: str, background: str | None, token: str = TOKEN) -> str:
    """ "sks, a star" or "sks, a star on a grey background"."""
    return f"{token}, a {shape}" + (f" on a {background} background" if background else "")


@torch.no_grad()
def encode_latents(base, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [-1, 1] -> scaled VAE latents (the distribution's mode, as the trainer's cache)."""
    scale = base.vae.config.scaling_factor
    return (
        torch.cat([base.vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)]) * scale
    )


def class_embeddings(base, words) -> torch.Tensor:
    """[len(words), D] rows of the text encoder's token table for one-token words."""
    from catfast.integrations.word_embedding import single_token, token_table

    ids = [single_token(base.tokenizer, w) for w in words]
    return token_table(base.text_encoder).weight.detach()[ids].float().clone()


def pretrain(
    out: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    command: str | None = None,
    log=print,
    **overrides,
) -> Path:
    """Train and write the E4T assets to ``out`` (module docstring); returns its path."""
    from catfast.adapters.adapter import LoraAdapter, LoraLayer
    from catfast.adapters.formats import write_adapter
    from catfast.demo.encoder import load_encoder as load_attribute_encoder
    from catfast.demo.encoder import to_tensor
    from catfast.demo.shipped import check_assets, encoder_path, model_path, write_manifest
    from catfast.e4t.losses import embedding_penalty, lora_parameters, offset_penalty
    from catfast.errors import CatfastError
    from catfast.folders import check_target, staged_folder
    from catfast.integrations.models import load_base
    from catfast.integrations.peft_adapters import add_lora, extract_adapter
    from catfast.integrations.word_embedding import encode, single_token

    s = {**SETTINGS, **overrides}
    unknown = set(s) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    out = Path(out).absolute()
    check_target(out, overwrite, CatfastError)
    check_assets()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = load_base(model_path())
    unet, scheduler = base.unet, base.scheduler
    base.text_encoder.requires_grad_(False)
    base.vae.requires_grad_(False)
    add_lora(unet, rank=DOMAIN_RANK, alpha=DOMAIN_RANK, target_modules=TARGETS, adapter_name="domain")
    lora = lora_parameters(unet, "domain")
    encoder = ConceptEncoder(dim=base.text_encoder.config.hidden_size)
    encoder.init_trunk_from(load_attribute_encoder(encoder_path()).net)
    token_id = single_token(base.tokenizer, TOKEN)

    train_concepts, held_out = cc.split()
    train_concepts = train_concepts[: s["pool_concepts"]]
    scenes = [v for c in train_concepts for v in cc.views(c, VIEWS, seed)]
    pixels = to_tensor([world.render(v) for v in scenes])
    latents = encode_latents(base, pixels)
    prior = world.dataset(s["prior_images"], seed + 500)
    prior_latents = encode_latents(base, to_tensor([world.render(p) for p, _ in prior]))
    prior_captions = [c for _, c in prior]
    v_class = class_embeddings(base, world.SHAPES)
    shape_index = torch.tensor([world.SHAPES.index(c.shape) for c in train_concepts])
    log(
        f"pool: {len(train_concepts)} concepts x {VIEWS} views, {len(prior)} prior pictures "
        f"({time.perf_counter() - t0:.0f} s); held out: {len(held_out)} concepts"
    )

    trunk = list(encoder.trunk.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": lora + list(encoder.head.parameters()), "lr": s["lr"]},
            {"params": trunk, "lr": s["trunk_lr"]},
        ],
        weight_decay=0.0,
    )
    steps, warmup = s["steps"], s["warmup"]

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    encoder.train()
    unet.train()
    nc, npr = s["concept_rows"], s["prior_rows"]
    ema = None
    for step in range(steps):
        ci = torch.randint(0, len(train_concepts), (nc,), generator=gen)
        target = torch.randint(0, VIEWS, (nc,), generator=gen)
        source = (target + torch.randint(1, VIEWS, (nc,), generator=gen)) % VIEWS
        x_in = pixels[ci * VIEWS + source]
        x_in = x_in + 0.03 * torch.randn(x_in.shape, generator=gen)
        z_c = latents[ci * VIEWS + target]
        with_bg = torch.rand(nc, generator=gen) < 0.5
        captions = [
            concept_caption(train_concepts[int(c)].shape, scenes[int(c) * VIEWS + int(t)].background if b else None)
            for c, t, b in zip(ci, target, with_bg)
        ]
        pi = torch.randint(0, len(prior), (npr,), generator=gen)
        empty = torch.rand(npr, generator=gen) < 0.1
        p_caps = ["" if e else prior_captions[int(i)] for i, e in zip(pi, empty)]

        offset = encoder(x_in)
        vc = v_class[shape_index[ci]]
        v = vc + offset
        cond = encode(base, captions, token_id, v)
        with torch.no_grad():
            cond_p = encode(base, p_caps)
        z0 = torch.cat([z_c, prior_latents[pi]])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, torch.cat([cond, cond_p])).sample
        mse = torch.nn.functional.mse_loss(pred.float(), noise)
        loss = mse + s["embed_weight"] * embedding_penalty(v, vc) + s["offset_weight"] * offset_penalty(unet, "domain")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + list(encoder.parameters()), 1.0)
        opt.step()
        sched.step()
        ema = mse.item() if ema is None else 0.98 * ema + 0.02 * mse.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}: mse {ema:.4f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    log(f"pretrained in {seconds:.0f} s")

    from catfast.e4t.model import save_encoder

    domain = extract_adapter(unet, "domain")
    half = {k: LoraLayer(v.down.half(), v.up.half(), v.alpha) for k, v in domain.layers.items()}
    metadata = {"catfast.e4t.domain": "demo", "catfast.e4t.token": TOKEN}
    with staged_folder(out) as tmp:
        save_encoder(encoder.eval(), tmp / ENCODER_FILE)
        write_adapter(LoraAdapter(half, metadata), tmp / DOMAIN_FILE)
        record = dict(
            command=command,
            seed=seed,
            settings=s,
            domain_rank=DOMAIN_RANK,
            targets=list(TARGETS),
            token=TOKEN,
            views=VIEWS,
            training_concepts=len(train_concepts),
            held_out=[c.name for c in held_out],
            threads=torch.get_num_threads(),
            seconds=round(seconds),
            final_mse_ema=round(ema, 4),
        )
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        write_manifest(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="E4T domain pre-training on the demo world (catfast/e4t/pretrain.py).")
    parser.add_argument("--out", required=True, help="folder to write the E4T assets to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pretrain(
        args.out,
        seed=args.seed,
        steps=args.steps,
        overwrite=args.overwrite,
        command="OMP_NUM_THREADS=1 python -m catfast.e4t.pretrain "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        log=lambda m: print(m, flush=True),
    )


if __name__ == "__main__":
    main()
