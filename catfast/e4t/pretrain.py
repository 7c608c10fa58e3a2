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
from dataclasses import dataclass
from pathlib import Path

import torch

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import write_adapter
from catfast.demo import world
from catfast.demo.encoder import load_encoder as load_attribute_encoder
from catfast.demo.encoder import to_tensor
from catfast.e4t import concepts as cc
from catfast.e4t.losses import embedding_penalty, lora_parameters, offset_penalty
from catfast.e4t.model import (
    DOMAIN_FILE,
    DOMAIN_RANK,
    ENCODER_FILE,
    RECORD_FILE,
    TARGETS,
    ConceptEncoder,
    save_encoder,
)
from catfast.errors import CatfastError
from catfast.folders import check_target, staged_folder
from catfast.integrations.models import load_base
from catfast.integrations.peft_adapters import add_lora, extract_adapter
from catfast.integrations.word_embedding import encode, single_token, token_table
from catfast.shipped import check_assets, encoder_path, model_path, write_manifest

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
    ids = [single_token(base.tokenizer, w) for w in words]
    return token_table(base.text_encoder).weight.detach()[ids].float().clone()


def _settings(overrides: dict) -> dict:
    """SETTINGS with ``overrides`` applied; TypeError naming any key SETTINGS lacks."""
    s = {**SETTINGS, **overrides}
    unknown = set(s) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    return s


def _load_models():
    """(base, domain LoRA parameters, concept encoder, placeholder token id): the shipped demo model, frozen but
    for a fresh rank-DOMAIN_RANK "domain" LoRA on TARGETS, and a ConceptEncoder whose trunk starts from the
    demo's attribute encoder. Draws the LoRA's and the head's initial values from torch's global RNG."""
    base = load_base(model_path())
    base.text_encoder.requires_grad_(False)
    base.vae.requires_grad_(False)
    add_lora(base.unet, rank=DOMAIN_RANK, alpha=DOMAIN_RANK, target_modules=TARGETS, adapter_name="domain")
    lora = lora_parameters(base.unet, "domain")
    encoder = ConceptEncoder(dim=base.text_encoder.config.hidden_size)
    encoder.init_trunk_from(load_attribute_encoder(encoder_path()).net)
    return base, lora, encoder, single_token(base.tokenizer, TOKEN)


@dataclass
class _Pool:
    """What batches are drawn from. Concept c's view j is row ``c * VIEWS + j`` of ``scenes``/``pixels``/
    ``latents``; ``pixels`` [C*VIEWS, 3, S, S] in [-1, 1], ``latents`` [C*VIEWS, 4, s, s]; the prior pictures'
    ``prior_latents`` [P, 4, s, s] with ``prior_captions`` (P); ``v_class`` [len(world.SHAPES), D];
    ``shape_index`` [C]: concept -> row of ``v_class``."""

    concepts: list
    held_out: list
    scenes: list
    pixels: torch.Tensor
    latents: torch.Tensor
    prior_latents: torch.Tensor
    prior_captions: list[str]
    v_class: torch.Tensor
    shape_index: torch.Tensor


def _build_pool(base, s: dict, seed: int) -> _Pool:
    """Render and encode the training concepts' views and the prior pictures (the held-out concepts never)."""
    train_concepts, held_out = cc.split()
    train_concepts = train_concepts[: s["pool_concepts"]]
    scenes = [v for c in train_concepts for v in cc.views(c, VIEWS, seed)]
    pixels = to_tensor([world.render(v) for v in scenes])
    latents = encode_latents(base, pixels)
    prior = world.dataset(s["prior_images"], seed + 500)
    prior_latents = encode_latents(base, to_tensor([world.render(p) for p, _ in prior]))
    return _Pool(
        concepts=train_concepts,
        held_out=held_out,
        scenes=scenes,
        pixels=pixels,
        latents=latents,
        prior_latents=prior_latents,
        prior_captions=[c for _, c in prior],
        v_class=class_embeddings(base, world.SHAPES),
        shape_index=torch.tensor([world.SHAPES.index(c.shape) for c in train_concepts]),
    )


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _optimizer(lora: list, encoder: ConceptEncoder, s: dict):
    """(AdamW, its LambdaLR): LoRA + encoder head at ``lr``, the encoder's trunk at ``trunk_lr``."""
    opt = torch.optim.AdamW(
        [
            {"params": lora + list(encoder.head.parameters()), "lr": s["lr"]},
            {"params": list(encoder.trunk.parameters()), "lr": s["trunk_lr"]},
        ],
        weight_decay=0.0,
    )
    steps, warmup = s["steps"], s["warmup"]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, steps, warmup))


def _draw_batch(pool: _Pool, nc: int, npr: int, gen: torch.Generator):
    """One batch's draws from ``gen``: (ci [nc] concept indices, x_in [nc, 3, S, S] noised encoder inputs (another
    view than the target), z_c [nc, 4, s, s] target latents, nc concept captions, pi [npr] prior indices, npr prior
    captions (10% empty))."""
    ci = torch.randint(0, len(pool.concepts), (nc,), generator=gen)
    target = torch.randint(0, VIEWS, (nc,), generator=gen)
    source = (target + torch.randint(1, VIEWS, (nc,), generator=gen)) % VIEWS
    x_in = pool.pixels[ci * VIEWS + source]
    x_in = x_in + 0.03 * torch.randn(x_in.shape, generator=gen)
    z_c = pool.latents[ci * VIEWS + target]
    with_bg = torch.rand(nc, generator=gen) < 0.5
    captions = [
        concept_caption(pool.concepts[int(c)].shape, pool.scenes[int(c) * VIEWS + int(t)].background if b else None)
        for c, t, b in zip(ci, target, with_bg)
    ]
    pi = torch.randint(0, len(pool.prior_captions), (npr,), generator=gen)
    empty = torch.rand(npr, generator=gen) < 0.1
    p_caps = ["" if e else pool.prior_captions[int(i)] for i, e in zip(pi, empty)]
    return ci, x_in, z_c, captions, pi, p_caps


def _train(base, lora: list, encoder: ConceptEncoder, token_id: int, pool: _Pool, s: dict, gen, t0: float, log):
    """Run ``s["steps"]`` optimizer steps (loss: module docstring), logging every 100; returns the final
    exponential moving average (0.98) of the diffusion MSE."""
    unet, scheduler = base.unet, base.scheduler
    opt, sched = _optimizer(lora, encoder, s)
    encoder.train()
    unet.train()
    steps, nc, npr = s["steps"], s["concept_rows"], s["prior_rows"]
    ema = None
    for step in range(steps):
        ci, x_in, z_c, captions, pi, p_caps = _draw_batch(pool, nc, npr, gen)
        offset = encoder(x_in)
        vc = pool.v_class[pool.shape_index[ci]]
        v = vc + offset
        cond = encode(base, captions, token_id, v)
        with torch.no_grad():
            cond_p = encode(base, p_caps)
        z0 = torch.cat([z_c, pool.prior_latents[pi]])
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
    return ema


def _write_assets(out: Path, encoder: ConceptEncoder, unet, record: dict) -> None:
    """Write the encoder, the domain LoRA (fp16), the record and the manifest to ``out`` (staged, then moved)."""
    domain = extract_adapter(unet, "domain")
    half = {k: LoraLayer(v.down.half(), v.up.half(), v.alpha) for k, v in domain.layers.items()}
    metadata = {"catfast.e4t.domain": "demo", "catfast.e4t.token": TOKEN}
    with staged_folder(out) as tmp:
        save_encoder(encoder.eval(), tmp / ENCODER_FILE)
        write_adapter(LoraAdapter(half, metadata), tmp / DOMAIN_FILE)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        write_manifest(tmp)


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
    s = _settings(overrides)
    out = Path(out).absolute()
    check_target(out, overwrite, CatfastError)
    check_assets()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base, lora, encoder, token_id = _load_models()
    pool = _build_pool(base, s, seed)
    log(
        f"pool: {len(pool.concepts)} concepts x {VIEWS} views, {len(pool.prior_captions)} prior pictures "
        f"({time.perf_counter() - t0:.0f} s); held out: {len(pool.held_out)} concepts"
    )
    ema = _train(base, lora, encoder, token_id, pool, s, gen, t0, log)
    seconds = time.perf_counter() - t0
    log(f"pretrained in {seconds:.0f} s")
    record = dict(
        command=command,
        seed=seed,
        settings=s,
        domain_rank=DOMAIN_RANK,
        targets=list(TARGETS),
        token=TOKEN,
        views=VIEWS,
        training_concepts=len(pool.concepts),
        held_out=[c.name for c in pool.held_out],
        threads=torch.get_num_threads(),
        seconds=round(seconds),
        final_mse_ema=round(ema, 4),
    )
    _write_assets(out, encoder, base.unet, record)
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
