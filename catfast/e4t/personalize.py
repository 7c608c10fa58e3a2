"""Personalize the demo model from one picture in a few steps (E4T): ``catfast personalize``.

1. Check the picture (converted to RGB when it is another mode; a square picture of another size is
   resized to the world's 32 px; anything else refused with the reason), the class word and the
   placeholder word (each must be one token of the text encoder), and the shipped E4T files (manifest).
2. The concept encoder gives ``v* = v_class + E(x)``.
3. ``steps`` tuning steps (Adam) of v* and of the domain offsets (the pretrained LoRA, tuned in place) on
   the one picture captioned "<token>, a <class>": the diffusion loss, ``cat_weight`` x the CAT term (the
   stripped caption "a <class>" on the adapter against the base model without any offsets,
   ``catfast.train.objective.cat_loss``), and the two E4T regularizers (``losses.py``).
4. Write OUT/<name>.safetensors: a diffusers-format LoRA of the tuned offsets whose metadata carries v*
   and the placeholder word (``catfast/integrations/word_embedding.py``), and OUT/<name>.json (settings, seconds).

0 steps gives the encoder's embedding with the untuned domain offsets.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import read_adapter, write_adapter
from catfast.demo import world
from catfast.demo.encoder import to_tensor
from catfast.e4t.losses import embedding_penalty, lora_parameters, offset_penalty
from catfast.e4t.model import DOMAIN_FILE, ENCODER_FILE, ConceptEncoder, check_shipped, load_encoder
from catfast.e4t.pretrain import encode_latents
from catfast.errors import CatfastError
from catfast.folders import check_output_file, write_atomic
from catfast.integrations.models import load_base
from catfast.integrations.peft_adapters import _remove, attach_adapter, extract_adapter
from catfast.integrations.word_embedding import embedding_metadata, encode, single_token, token_table
from catfast.shipped import model_path
from catfast.train.data import load_image
from catfast.train.objective import cat_loss

TOKEN = "sks"


@dataclass
class TuneSettings:
    """Tuning hyper-parameters (defaults: what docs/e4t.md measured)."""

    steps: int = 15
    batch: int = 4
    lr: float = 1e-3  # LoRA offsets
    embed_lr: float = 1e-3  # v*
    cat_weight: float = 0.0
    embed_weight: float = 0.01
    offset_weight: float = 0.01
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0:
            raise CatfastError(f"--steps must be >= 0, got {self.steps}")
        if self.batch < 1:
            raise CatfastError(f"batch must be >= 1, got {self.batch}")
        if self.cat_weight < 0:
            raise CatfastError(f"cat weight must be >= 0, got {self.cat_weight}")


def load_picture(image, side: int) -> tuple[object, list[str]]:
    """(RGB PIL image of side x side, notes on what was converted) from a path or a PIL image;
    CatfastError when it cannot be read or is not square."""
    notes = []
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise CatfastError(f"{path}: no such image file")
        try:
            with Image.open(path) as probe:
                mode = probe.mode
        except Exception as e:  # PIL raises several types for files that are not images
            raise CatfastError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from None
        picture = load_image(path)
        where = str(path)
    else:
        mode, picture, where = image.mode, image.convert("RGB"), "image"
    if mode != "RGB":
        notes.append(f"{where}: converted from mode {mode} to RGB")
    w, h = picture.size
    if w != h:
        raise CatfastError(
            f"{where}: is {w}x{h} pixels; the demo world's pictures are square ({side}x{side}): crop it to a square "
            "around the object first"
        )
    if w != side:
        picture = picture.resize((side, side), Image.Resampling.BOX if w > side else Image.Resampling.BILINEAR)
        notes.append(f"{where}: resized from {w}x{h} to the model's {side}x{side} pixels")
    return picture, notes


@dataclass
class Personalized:
    adapter: Path
    seconds: float  # tuning, from the encoder to the written file (models already loaded)
    total_seconds: float  # including loading the models
    notes: list[str]
    losses: list[float]


def _check_request(settings: TuneSettings | None, class_word: str, out, name: str | None, overwrite: bool):
    """(checked settings (default TuneSettings()), file name stem, OUT as a Path, OUT/<name>.safetensors);
    CatfastError for bad settings, a linked ``out``, a name that is not a plain file name, or output files that
    may not be written."""
    settings = settings or TuneSettings()
    settings.check()
    name = name or f"e4t-{class_word}"
    out = Path(out)
    if out.is_symlink():
        raise CatfastError(f"{out}: is a symbolic link; catfast does not write through links: give the real folder")
    if "/" in name or "\\" in name or name.startswith("."):
        raise CatfastError(f"--name {name!r} must be a plain file name")
    target = out / f"{name}.safetensors"
    check_output_file(target, overwrite, CatfastError)
    check_output_file(out / f"{name}.json", True, CatfastError)
    return settings, name, out, target


def _word_ids(base, class_word: str, token: str) -> tuple[int, int]:
    """(class word's token id, placeholder's token id); CatfastError unless each is one token and they differ."""
    class_id = single_token(base.tokenizer, class_word, "class word")
    token_id = single_token(base.tokenizer, token, "placeholder word")
    if token_id == class_id:
        raise CatfastError(f"the placeholder word {token!r} must differ from the class word")
    return class_id, token_id


def _load_e4t(root: Path) -> tuple[ConceptEncoder, LoraAdapter]:
    """(concept encoder, domain offsets as an fp32 LoraAdapter without metadata) from the E4T files in ``root``."""
    encoder = load_encoder(root / ENCODER_FILE)
    domain = read_adapter(root / DOMAIN_FILE)
    domain = LoraAdapter({k: LoraLayer(v.down.float(), v.up.float(), v.alpha) for k, v in domain.layers.items()})
    return encoder, domain


def _tune_steps(base, v, v_class, z, token_id: int, prompt: str, stripped: str, settings: TuneSettings, gen):
    """``settings.steps`` Adam steps of the "e4t" LoRA on ``base.unet`` and of ``v`` [D] (in place), each on a
    batch of ``settings.batch`` copies of the latent ``z`` [1, 4, s, s] captioned ``prompt`` (v at ``token_id``);
    loss: module docstring. Returns each step's diffusion loss, rounded to 5 digits."""
    unet = base.unet
    losses = []
    lora = lora_parameters(unet, "e4t")
    opt = torch.optim.Adam([{"params": lora, "lr": settings.lr}, {"params": [v], "lr": settings.embed_lr}])
    b = settings.batch
    with torch.no_grad():
        cond_stripped = encode(base, [stripped] * b)
    unet.train()
    for _ in range(settings.steps):
        noise = torch.randn((b, *z.shape[1:]), generator=gen)
        t = torch.randint(0, base.scheduler.config.num_train_timesteps, (b,), generator=gen)
        cond = encode(base, [prompt] * b, token_id, v)
        out_loss = cat_loss(
            unet,
            base.scheduler,
            latents=z.expand(b, -1, -1, -1),
            noise=noise,
            timesteps=t,
            cond=cond,
            cond_stripped=cond_stripped,
            cat_weight=settings.cat_weight,
            mode="reference",
        )
        loss = (
            out_loss.total
            + settings.embed_weight * embedding_penalty(v, v_class)
            + settings.offset_weight * offset_penalty(unet, "e4t")
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(out_loss.ldm.item(), 5))
    unet.eval()
    return losses


def _tune(base, encoder, picture, class_id: int, token_id: int, class_word: str, token: str, settings: TuneSettings):
    """(tuned v* [D] as a Parameter, per-step losses): v* starts at v_class + E(picture); the "e4t" LoRA already on
    ``base.unet`` is tuned in place (nothing is tuned at 0 steps)."""
    gen = torch.Generator().manual_seed(settings.seed)
    x = to_tensor([picture])
    v_class = token_table(base.text_encoder).weight.detach()[class_id].float().clone()
    with torch.no_grad():
        v0 = v_class + encoder(x)[0]
        z = encode_latents(base, x)
    v = torch.nn.Parameter(v0.clone())
    losses = []
    if settings.steps:
        prompt, stripped = f"{token}, a {class_word}", f"a {class_word}"
        losses = _tune_steps(base, v, v_class, z, token_id, prompt, stripped, settings, gen)
    return v, losses


def _write_tuned(unet, target: Path, token: str, v, class_word: str, steps: int) -> None:
    """Write the "e4t" LoRA of ``unet`` to ``target``, its metadata carrying v* and the placeholder word."""
    adapter = extract_adapter(unet, "e4t")
    adapter.metadata = {
        **embedding_metadata(token, v.detach(), class_word),
        "catfast.e4t.steps": str(steps),
        # the placeholder is the adapter's trigger word, recorded where the trainer records its triggers:
        # `/v1/adapters` and the playground list it from there
        "catfast.triggers": json.dumps([token]),
    }
    write_adapter(adapter, target, overwrite=True)


def personalize(
    image,
    class_word: str,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    token: str = TOKEN,
    settings: TuneSettings | None = None,
    assets: str | os.PathLike | None = None,
    base=None,
    overwrite: bool = False,
    log=lambda m: None,
) -> Personalized:
    """Personalize (module docstring) and write OUT/<name>.safetensors (name default "e4t-<class>").
    ``base``: an already loaded demo model (its UNet must carry no adapter; it is left as it was);
    ``assets``: the E4T files folder (default the shipped one)."""
    t_all = time.perf_counter()
    settings, name, out, target = _check_request(settings, class_word, out, name, overwrite)
    picture, notes = load_picture(image, world.SIDE)
    root = check_shipped(assets)
    if base is None:
        base = load_base(model_path())
    class_id, token_id = _word_ids(base, class_word, token)
    encoder, domain = _load_e4t(root)
    unet = base.unet
    had_peft = bool(getattr(unet, "peft_config", None))
    attach_adapter(unet, domain, "e4t")
    try:
        t0 = time.perf_counter()
        v, losses = _tune(base, encoder, picture, class_id, token_id, class_word, token, settings)
        _write_tuned(unet, target, token, v, class_word, settings.steps)
        seconds = time.perf_counter() - t0
    finally:
        unet.requires_grad_(False)
        _remove(unet, "e4t", had_peft)
    record = dict(
        image=str(image) if isinstance(image, (str, os.PathLike)) else "image",
        class_word=class_word,
        token=token,
        settings=asdict(settings),
        seconds=round(seconds, 3),
        total_seconds=round(time.perf_counter() - t_all, 3),
        threads=torch.get_num_threads(),
        losses=losses,
        notes=notes,
    )
    write_atomic(out / f"{name}.json", (json.dumps(record, indent=1) + "\n").encode())
    log(f"wrote {target} in {seconds:.2f} s ({settings.steps} steps)")
    return Personalized(target, seconds, time.perf_counter() - t_all, notes, losses)
