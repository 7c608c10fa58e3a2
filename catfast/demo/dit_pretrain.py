"""Pretrain the demo's diffusion transformer (a tiny FLUX.1-style model) on the demo world, on a CPU.

    python -m catfast.demo.dit_pretrain --out DIR

The shipped model is that command (``--steps 7000``, the default: 27.5 min on the shared 2-core dev CPU, 1
thread; its pretrain.json records the command and time). At guidance-free sampling (20 Euler steps) the shipped
attribute encoder reads the asked-for shape, colour and background in 48%, 90% and 100% of 48 full-caption
pictures (``measure_words``): colour and background are followed, shape weakly (chance: 20%; its stars, boxes
and moons are blobs). A second stage (``--init`` it, ``--steps 3500 --lr 3e-4``, 16.5 min more) gave 44%, 92%
and 100%: not shipped.

Writes a complete ``FluxPipeline`` folder (model_index.json, transformer/, text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/, vae/, scheduler/; fp16 safetensors) and DIR/pretrain.json (the command,
settings, seconds, and how well the model follows words). The shipped one is catfast/demo/assets/dit_model.

- transformer: ``FluxTransformer2DModel`` (``DIT_CONFIG``: 2 double-stream and 2 single-stream blocks, 4 heads
  x 32, rotary 8 + 12 + 12), on the UNet demo's 8-channel 8x8 latents packed 2x2 into 16 tokens of 32; no
  guidance embedding (FLUX.1-schnell style: nothing to distil it from, so sampling runs no CFG rows).
- VAE, CLIP text encoder and tokenizer: the UNet demo model's of its first three stages, copied unchanged and
  kept frozen (read from the shipped DiT folder, which holds them: the UNet demo's text encoder trained on in
  its two striped stages); CLIP's pooled output is the transformer's ``pooled_projections``.
- T5 (``text_encoder_2``): a tiny ``T5EncoderModel`` (``T5_CONFIG``) over factory_dit's offline T5 vocabulary
  (every world word is one token), trained jointly with the transformer, with ``TEXT_LENGTH`` tokens per
  caption (its tokenizer's ``model_max_length``, which ``FluxFamily.text_length`` reads: FLUX.1's 512 padded
  tokens would cost 16x the step). In plain diffusers pass ``max_sequence_length=16``.
- training: the flow-matching velocity ``noise - x0`` at sigmas from the flux family's recipe (uniform, then
  the resolution shift of 16 tokens), on the world's captions (``world.scene`` + ``caption_detail``, 10%
  empty), AdamW with warmup and cosine decay. Seeded: the same command writes the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from catfast.demo import world
from catfast.demo.pretrain import _cosine, image_pool, update
from catfast.errors import CatfastError
from catfast.folders import check_target, staged_folder
from catfast.integrations.factory_demo_dit import TEXT_LENGTH, build_parts, load_flux, save_folder
from catfast.integrations.families.flux import FAMILY

SAMPLE_STEPS = 20  # Euler steps of the word measurement (the demo's)


@torch.no_grad()
def encode_world(parts: dict, images: int, seed: int):
    """(latents [N, 8, 8, 8] as the flux family scales them, T5 ids [U, TEXT_LENGTH], CLIP pooled [U, 64],
    caption index [N] into the unique captions; index 0 is the empty caption)."""
    pixels, captions = image_pool(images, seed, patterns=False)
    vae = parts["vae"]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
    latents = (means - shift) * vae.config.scaling_factor
    unique = sorted(set([""] + captions))  # "" sorts first
    where = {c: i for i, c in enumerate(unique)}
    # what FluxPipeline._get_t5_prompt_embeds / _get_clip_prompt_embeds tokenize
    ids = parts["tokenizer_2"](unique, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                               return_tensors="pt").input_ids  # fmt: skip
    tok = parts["tokenizer"]
    clip_ids = tok(unique, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids  # fmt: skip
    pooled = torch.cat([parts["text_encoder"](clip_ids[i : i + 256]).pooler_output for i in range(0, len(unique), 256)])
    return latents, ids, pooled, torch.tensor([where[c] for c in captions])


def train_dit(parts, latents, ids, pooled, cond_index, *, steps, batch, lr, seed, log=print) -> None:
    """Flow-matching training of the transformer and T5 jointly (module docstring); 10% empty captions."""
    gen = torch.Generator().manual_seed(seed)
    model, t5 = parts["transformer"].train(), parts["text_encoder_2"].train()
    params = list(model.parameters()) + list(t5.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 100))
    seq_len = FAMILY.image_seq_len(latents[:1])
    t0, ema = time.perf_counter(), None
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        z0, c = latents[idx], cond_index[idx].clone()
        c[torch.rand(batch, generator=gen) < 0.1] = 0
        sigmas = FAMILY.flow.sample_sigmas(batch, seq_len, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        s = sigmas.view(-1, 1, 1, 1)
        cond = {"prompt_embeds": t5(ids[c])[0], "pooled_prompt_embeds": pooled[c]}
        pred = FAMILY.predict(model, (1 - s) * z0 + s * noise, sigmas, cond)
        loss = torch.nn.functional.mse_loss(pred, noise - z0)
        update(loss, opt, sched, params)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"dit step {step}/{steps}: loss {ema:.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)


def word_prompts(n: int = 48, seed: int = 777) -> list[world.Scene]:
    """n scenes of a seed that pretraining does not draw, each captioned in full (size, color, background)."""
    return [world.scene(seed, i) for i in range(n)]


def measure_words(pipe, encoder, *, n: int = 48, seed: int = 777, steps: int = SAMPLE_STEPS) -> dict:
    """The share of ``n`` full-caption pictures (sampling seed = index) in which the attribute encoder reads
    the asked-for shape, color and background: {"shape": .., "color": .., "background": .., "n": n}."""
    from catfast.eval.flow_sampler import sample_flow_images

    scenes = word_prompts(n, seed)
    prompts = [s.caption() for s in scenes]
    side = world.SIDE
    images, _ = sample_flow_images(pipe, prompts, adapters=[None] * n, seeds=list(range(n)), steps=steps,
                                   height=side, width=side)  # fmt: skip
    read = encoder.read(images)
    out = {
        head: round(sum(r == getattr(s, head) for r, s in zip(read[head], scenes)) / n, 4)
        for head in ("shape", "color", "background")
    }
    return {**out, "n": n, "steps": steps}


def pretrain(out, *, seed=0, steps=7000, images=20000, batch=64, lr=1e-3, overwrite=False, command=None,
             unet_demo=None, init=None, measure=True, log=print) -> Path:  # fmt: skip
    """Train the transformer and T5 and write the folder to ``out`` (atomically); returns its path.
    ``unet_demo``: the folder whose VAE, CLIP and tokenizer are reused (default: the shipped DiT folder's, the
    UNet demo's of its first three stages); ``init``: an
    earlier output whose transformer and T5 this run continues (a second stage, e.g. at a lower ``lr``)."""
    from catfast.shipped import dit_model_path, encoder_path

    out = Path(out).absolute()
    check_target(out, overwrite, CatfastError)
    unet_demo = Path(unet_demo or dit_model_path())
    torch.manual_seed(seed)
    parts = build_parts(unet_demo, seed, init)
    if init is not None:
        seed = seed + 1000  # a second stage draws other batches and noise than the first
    t0 = time.perf_counter()
    latents, ids, pooled, cond_index = encode_world(parts, images, seed)
    train_dit(parts, latents, ids, pooled, cond_index, steps=steps, batch=batch, lr=lr, seed=seed, log=log)
    seconds = time.perf_counter() - t0
    log(f"pretrained in {seconds:.0f} s")
    info = dict(seed=seed, steps=steps, images=images, batch=batch, lr=lr, text_length=TEXT_LENGTH,
                threads=torch.get_num_threads(), seconds=round(seconds))  # fmt: skip
    if command:
        info["command"] = command
    if init is not None:
        info["init"] = json.loads((Path(init) / "pretrain.json").read_text())
        info["seconds"] += info["init"]["seconds"]
    with staged_folder(out) as tmp:
        save_folder(parts, tmp, unet_demo)
        if measure:
            from catfast.demo.encoder import load_encoder

            pipe = load_flux(tmp)
            info["words"] = measure_words(pipe, load_encoder(encoder_path()))
            log(f"follows words: {info['words']}")
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the pipeline folder to")
    for name, default in (("seed", 0), ("steps", 7000), ("images", 20000), ("batch", 64), ("lr", 1e-3)):
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--init", default=None, help="continue the transformer and T5 of this earlier output")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-measure", action="store_true", help="skip the word-following measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible)")
    opts = vars(parser.parse_args(argv))
    torch.set_num_threads(opts.pop("threads"))
    measure = not opts.pop("no_measure")
    command = "python -m catfast.demo.dit_pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    pretrain(opts.pop("out"), **opts, measure=measure, command=command, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
