"""The demo's domain image encoder: an attribute classifier of demo-world pictures that implements
catfast.eval's ``ImageTextEncoder``, so KPS and diversity can be scored without CLIP.

A small CNN predicts each attribute of ``HEADS`` (shape, color, background, size, pattern) of a 32 px
picture. An image's embedding is the concatenation of its per-attribute probability vectors, each scaled
by 1/sqrt(number of heads), then L2-normalized: the cosine of two images is high when they agree on
every attribute, and drops by about the same amount for each attribute they disagree on. A caption's
embedding is built the same way from the attributes it names (one-hot), with a uniform distribution for
the attributes it does not name.

    python -m catfast.demo.encoder --out FILE     # train on the world and write the weights
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load, save
from torch import nn

from catfast.demo import world
from catfast.errors import CatfastError
from catfast.eval.kps import identity_accuracy
from catfast.folders import write_atomic

HEADS: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES,
    "color": tuple(world.COLORS),
    "background": tuple(world.BACKGROUNDS),
    "size": tuple(world.SIZES),
    "pattern": world.PATTERNS,
}


def labels(scene: world.Scene) -> dict[str, int]:
    """The class index of each head for a scene."""
    values = dict(
        shape=scene.shape, color=scene.color, background=scene.background, size=scene.size, pattern=scene.pattern
    )
    return {head: HEADS[head].index(values[head]) for head in HEADS}


class AttributeNet(nn.Module):
    """[N, 3, 32, 32] images in [-1, 1] -> {head: [N, classes] logits}."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        layers, c_in = [], 3
        for c_out, stride in ((w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 2)):  # 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({h: nn.Linear(4 * w, len(c)) for h, c in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {h: head(f) for h, head in self.heads.items()}


def to_tensor(images: list) -> torch.Tensor:
    """PIL images -> [N, 3, 32, 32] in [-1, 1] (resized to the world's side when they differ)."""

    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (world.SIDE, world.SIDE):
            im = im.resize((world.SIDE, world.SIDE), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _embedding(probs: dict[str, torch.Tensor]) -> torch.Tensor:
    scale = 1 / math.sqrt(len(HEADS))
    return nn.functional.normalize(torch.cat([probs[h] * scale for h in HEADS], dim=1), dim=1)


class DomainEncoder:
    """``ImageTextEncoder`` over an ``AttributeNet`` (module docstring)."""

    def __init__(self, net: AttributeNet):
        self.net = net.eval()

    @torch.no_grad()
    def predict(self, images: list) -> dict[str, torch.Tensor]:
        """{head: [N, classes] probabilities} of PIL images."""
        if not images:
            return {h: torch.zeros(0, len(c)) for h, c in HEADS.items()}
        x = to_tensor(images)
        outs = [self.net(x[i : i + 256]) for i in range(0, len(x), 256)]
        return {h: torch.cat([o[h] for o in outs]).softmax(dim=1) for h in HEADS}

    def read(self, images: list) -> dict[str, list[str]]:
        """{head: the class name it reads in each image} (the most probable class)."""
        probs = self.predict(images)
        return {h: [HEADS[h][int(i)] for i in probs[h].argmax(1)] for h in HEADS}

    def embed_images(self, images: list) -> torch.Tensor:
        return _embedding(self.predict(images))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        rows = {h: [] for h in HEADS}
        for text in texts:
            words = text.lower().replace(",", " ").split()
            for head, classes in HEADS.items():
                named = _named(head, classes, words)
                row = torch.full((len(classes),), 1.0 / len(classes))
                if named is not None:
                    row = nn.functional.one_hot(torch.tensor(named), len(classes)).float()
                rows[head].append(row)
        return _embedding({h: torch.stack(r) if r else torch.zeros(0, len(HEADS[h])) for h, r in rows.items()})


def concept_accuracy(encoder: DomainEncoder, images: list, concept: dict | None = None) -> float:
    """Identity accuracy (``catfast.eval.kps.identity_accuracy``) of ``images``: the share the encoder reads
    as the concept's shape, colour and pattern (``concept``: Scene fields; default the demo's striped star)."""
    return identity_accuracy(encoder.read(images), world.CONCEPT if concept is None else concept)


def _named(head: str, classes: tuple[str, ...], words: list[str]) -> int | None:
    """The class a caption names for a head: the background is the word before "background", the
    color the last color word before the shape word."""
    if head == "background":
        if "background" in words:
            i = words.index("background")
            if i > 0 and words[i - 1] in classes:
                return classes.index(words[i - 1])
        return None
    if head == "color":
        shape_at = next((i for i, w in enumerate(words) if w in world.SHAPES), len(words))
        found = [w for w in words[:shape_at] if w in classes]
        return classes.index(found[-1]) if found else None
    found = [w for w in words if w in classes]
    return classes.index(found[0]) if found else None


def _blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half of the batch slightly blurred (down to 16 px and back): generated images are softer than renders."""
    soft = nn.functional.interpolate(nn.functional.avg_pool2d(x, 2), scale_factor=2, mode="bilinear")
    pick = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).float()
    return pick * soft + (1 - pick) * x


def train_encoder(*, images: int = 12000, steps: int = 3000, batch: int = 64, seed: int = 0, log=print) -> AttributeNet:
    """Train an AttributeNet on world pictures with and without stripes (seeded, deterministic)."""
    pairs = world.dataset(images, seed + 100, patterns=True)
    x = to_tensor([world.render(s) for s, _ in pairs])
    y = {h: torch.tensor([labels(s)[h] for s, _ in pairs]) for h in HEADS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AttributeNet()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = _blur(x[idx], gen)
        xb = xb + 0.05 * torch.randn(xb.shape, generator=gen)
        out = net(xb)
        loss = sum(nn.functional.cross_entropy(out[h], y[h][idx]) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"encoder step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return net.eval()


def accuracy(encoder: DomainEncoder, n: int = 500, seed: int = 12345) -> dict[str, float]:
    """Per-head accuracy on n held-out world pictures (with stripes) of another seed."""
    pairs = world.dataset(n, seed, patterns=True)
    probs = encoder.predict([world.render(s) for s, _ in pairs])
    return {
        h: float((probs[h].argmax(1) == torch.tensor([labels(s)[h] for s, _ in pairs])).float().mean()) for h in HEADS
    }


def save_encoder(net: AttributeNet, path: str | os.PathLike) -> None:
    """fp16 safetensors, written atomically."""

    write_atomic(
        path, save({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()})
    )


def load_encoder(path: str | os.PathLike) -> DomainEncoder:
    """The DomainEncoder whose weights ``path`` holds; a missing or damaged file raises CatfastError."""

    path = Path(path)
    if not path.is_file():
        raise CatfastError(f"{path}: the demo image encoder is missing (reinstall catfast)")
    net = AttributeNet().eval()
    try:
        state = load(path.read_bytes())
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except Exception as e:  # safetensors / load_state_dict raise several types for damaged files
        raise CatfastError(
            f"{path}: the demo image encoder is damaged ({type(e).__name__}: {e}); reinstall catfast"
        ) from None
    return DomainEncoder(net)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the demo's attribute encoder on the demo world.")
    parser.add_argument("--out", required=True, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = train_encoder(steps=args.steps, seed=args.seed, log=lambda m: print(m, flush=True))
    save_encoder(net, args.out)
    print("held-out accuracy:", accuracy(DomainEncoder(net)))


if __name__ == "__main__":
    main()
