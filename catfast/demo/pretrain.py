"""Pretrain the demo's text-to-image base model on the demo world, on a CPU, reproducibly.

    python -m catfast.demo.pretrain --out DIR

The shipped model (catfast/demo/assets/model; its pretrain.json records each stage) was made in five
stages: the first three 66 min on the 2-core dev CPU with one thread, the last two 11 min with two:

    python -m catfast.demo.pretrain --out stage1                                   # VAE, then UNet
    python -m catfast.demo.pretrain --out stage2 --init stage1 --unet-steps 1500 --lr 5e-4
    python -m catfast.demo.pretrain --out stage3 --init stage2 --seed 1 --unet-steps 2400 --lr 5e-4 --train-text
    python -m catfast.demo.pretrain --out stage4 --init stage3 --seed 2 --unet-steps 600 --lr 3e-4 --train-text \
        --patterns --threads 2
    python -m catfast.demo.pretrain --out stage5 --init stage4 --seed 3 --unet-steps 900 --lr 2e-4 --train-text \
        --patterns --threads 2

``--patterns`` makes half of the UNet's pictures striped (captions unchanged), never as the shipped adapters'
objects: a base that knows stripes. On stage 3 (plain objects only) no recipe made the ball and box adapters
draw their objects (identity accuracy 0.0); on stage 5 they do (docs/serving.md).

Writes a complete diffusers folder (model_index.json, unet/, text_encoder/, tokenizer/, vae/,
scheduler/; fp16 safetensors) that ``load_base`` reads. Three parts:
- text encoder: a small CLIP text model with seeded random weights; the tokenizer is catfast's offline
  one, so every caption word is one token. Frozen unless ``--train-text``, which trains it jointly with
  the UNet. With the encoder frozen at random weights the UNet followed words weakly (at guidance 5, the
  asked-for color and background in 65% and 63% of the pictures after two stages); trained jointly in the
  third stage, 100% and 98%.
- VAE: an AutoencoderKL with 4x downsampling and ``LATENT_CHANNELS`` channels (32 px -> 8x8 latents),
  trained as an autoencoder (L1 + MSE + a small KL) on world images with and without stripes, so it can also
  encode a striped concept; its scaling_factor makes the latents unit-variance, as SD's does.
- UNet: SD's UNet2DConditionModel structure at small width on 8x8 latents, trained with the epsilon
  objective on the world's captions (10% empty captions for classifier-free guidance), AdamW with
  warmup and cosine decay. Everything is seeded; the image pools are pure functions of the seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from catfast.demo import world
from catfast.errors import CatfastError
from catfast.folders import check_target, staged_folder
from catfast.integrations import factory
from catfast.integrations.factory import save_components
from catfast.integrations.models import load_base

LATENT_CHANNELS = 8
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,
    act_fn="silu",
    sample_size=world.SIDE,
    mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=world.SIDE // 4,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=16,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)


def build_components(seed: int = 0) -> dict:
    """Untrained components in diffusers' model_index naming (fp32, seeded)."""
    return factory.build_components(
        UNET_CONFIG, {**VAE_CONFIG, "scaling_factor": 1.0}, factory.clip_text_config(**TEXT_CONFIG), seed=seed
    )


def image_pool(n: int, seed: int, *, patterns: bool, exclude=frozenset()) -> tuple[torch.Tensor, list[str]]:
    """n world images as a float tensor [n, 3, S, S] in [-1, 1], and their training captions (``world.dataset``)."""

    pairs = world.dataset(n, seed, patterns=patterns, exclude=exclude)
    pixels = np.stack([np.asarray(world.render(s)) for s, _ in pairs])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [c for _, c in pairs]


def concept_triples() -> frozenset:
    """(shape, color, stripe_color) of the objects the shipped demo adapters teach: what a world with stripes
    leaves out, so that each stays an object the base never saw."""
    from catfast.demo.adapters import CONCEPTS  # lazy: the adapters module is not needed to pretrain plain

    return frozenset((f["shape"], f["color"], f["stripe_color"]) for _, f in CONCEPTS.values())


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def update(loss: torch.Tensor, opt, sched, params) -> None:
    """One optimizer step on ``loss``: backward, gradients clipped to norm 1, the step and the lr schedule's."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def train_vae(vae, pool: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, log=print) -> float:
    """Autoencoder training: L1 + MSE reconstruction of the posterior sample + 1e-6 KL. Returns the final
    scaling factor (1 / std of the latent means over the pool)."""
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 50))
    t0 = time.perf_counter()
    for step in range(steps):
        x = pool[torch.randint(0, len(pool), (batch,), generator=gen)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        loss = l1 + (rec - x).pow(2).mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: l1 {l1.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pool[i : i + 256]).latent_dist.mode() for i in range(0, len(pool), 256)])
    return float(1.0 / means.std())


@torch.no_grad()
def _encode_captions(text_encoder, tokenizer, captions: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Unique captions' embeddings [U, 77, D] and each caption's index into them."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    emb = torch.cat([text_encoder(ids[i : i + 256])[0] for i in range(0, len(unique), 256)])
    where = {c: i for i, c in enumerate(unique)}
    return emb, [where[c] for c in captions]


def train_unet(
    unet,
    scheduler,
    latents,
    encode,
    cond_index,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    text_params=(),
    log=print,
) -> None:
    """epsilon-prediction training on latents [N, C, h, w] with caption index ``cond_index[n]``;
    ``encode(indices [B]) -> [B, 77, D]`` gives the text condition of caption indices. Index 0 must be the
    empty caption (used for 10% of the samples: classifier-free guidance). ``text_params``: text encoder
    parameters trained jointly (``encode`` then runs the encoder with grad)."""
    gen = torch.Generator().manual_seed(seed)
    cond_index = torch.tensor(cond_index)
    unet.train()
    params = list(unet.parameters()) + list(text_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 50))
    t0 = time.perf_counter()
    ema = None
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        z0 = latents[idx]
        c = cond_index[idx].clone()
        c[torch.rand(batch, generator=gen) < 0.1] = 0
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, encode(c)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        update(loss, opt, sched, params)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {ema:.4f} ({time.perf_counter() - t0:.0f} s)")
    unet.eval().requires_grad_(False)


def pretrain(
    out: str | Path,
    *,
    seed: int = 0,
    vae_steps: int = 1500,
    unet_steps: int = 1600,
    images: int = 20000,
    batch: int = 64,
    lr: float = 1e-3,
    init: str | Path | None = None,
    train_text: bool = False,
    patterns: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    log=print,
) -> Path:
    """Train every component and write the diffusers folder to ``out`` (atomically); returns its path.
    ``init``: a folder an earlier run wrote: keep its text encoder and VAE and continue training its UNet
    (a second stage, e.g. at a lower ``lr``) instead of starting from random weights. ``train_text``: train
    the text encoder jointly with the UNet. ``patterns``: the UNet's pictures are half striped (captions unchanged),
    without the shipped adapters' objects (``concept_triples``). ``command``: recorded in pretrain.json."""
    out = Path(out).absolute()
    check_target(out, overwrite, CatfastError)
    torch.manual_seed(seed)
    parts = build_components(seed)
    t0 = time.perf_counter()
    if init is None:
        vae_pool, _ = image_pool(images // 2, seed + 10, patterns=True)
        scale = train_vae(parts["vae"], vae_pool, steps=vae_steps, batch=32, lr=2e-3, seed=seed, log=log)
        parts["vae"].register_to_config(scaling_factor=scale)
    else:
        loaded = load_base(init)
        parts.update(unet=loaded.unet.requires_grad_(True), vae=loaded.vae, text_encoder=loaded.text_encoder)
        scale, vae_steps = loaded.vae.config.scaling_factor, 0
        seed = seed + 1000  # a second stage draws other batches and noise than the first
    t_vae = time.perf_counter() - t0
    pixels, captions = image_pool(images, seed, patterns=patterns, exclude=concept_triples() if patterns else ())
    with torch.no_grad():
        latents = torch.cat(
            [parts["vae"].encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)]
        )
    latents = latents * scale
    tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
    unique = sorted(set([""] + captions))  # "" sorts first: index 0 is the empty caption
    where = {c: i for i, c in enumerate(unique)}
    cond_index = [where[c] for c in captions]
    if train_text:
        ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        ids = ids.input_ids
        text_encoder.train().requires_grad_(True)

        def encode(c):
            return text_encoder(ids[c])[0]

        text_params = list(text_encoder.parameters())
    else:
        cond, _ = _encode_captions(text_encoder, tokenizer, unique)

        def encode(c):
            return cond[c]

        text_params = []
    train_unet(
        parts["unet"],
        parts["scheduler"],
        latents,
        encode,
        cond_index,
        steps=unet_steps,
        batch=batch,
        lr=lr,
        seed=seed,
        text_params=text_params,
        log=log,
    )
    text_encoder.eval().requires_grad_(False)
    seconds = time.perf_counter() - t0
    log(f"pretrained in {seconds:.0f} s (vae {t_vae:.0f} s)")
    with staged_folder(out) as tmp:
        save_components(parts, tmp)
        info = dict(
            seed=seed,
            vae_steps=vae_steps,
            unet_steps=unet_steps,
            images=images,
            batch=batch,
            lr=lr,
            train_text=train_text,
            **({"patterns": True} if patterns else {}),
        )
        if command:
            info["command"] = command
        if init is not None:
            info["init"] = json.loads((Path(init) / "pretrain.json").read_text())
        info["seconds"] = round(seconds) + (info.get("init") or {}).get("seconds", 0)
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the diffusers model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=1600)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="UNet learning rate")
    parser.add_argument("--init", default=None, help="continue the UNet of this earlier output (second stage)")
    parser.add_argument("--train-text", action="store_true", help="train the text encoder jointly with the UNet")
    parser.add_argument("--patterns", action="store_true",
                        help="half of the UNet's pictures striped, never as the shipped adapters' objects")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pretrain(
        args.out,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        images=args.images,
        batch=args.batch,
        lr=args.lr,
        init=args.init,
        train_text=args.train_text,
        patterns=args.patterns,
        overwrite=args.overwrite,
        command="python -m catfast.demo.pretrain " + " ".join(argv if argv is not None else sys.argv[1:]),
        log=lambda m: print(m, flush=True),
    )


if __name__ == "__main__":
    main()
