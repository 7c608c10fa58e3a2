"""The demo world: small procedural pictures of simple objects with captions, and the demo concept.

A scene is one object (``SHAPES``) of one color (``COLORS``) and size (``SIZES``) at a random place and
rotation on a plain background (``BACKGROUNDS``), drawn at 4x and box-downsampled to ``SIDE`` px (soft,
anti-aliased edges). Captions name what they show, "a large red star on a grey background", with each of
size, color and background left out at random (``caption_detail``), so that "a star" means any star: a
model trained on the world gives diverse images for short class prompts. Every caption word is one token
of catfast's offline tokenizer.

The concept ("sks, a star") is one particular object the world never shows: a striped star (``CONCEPT``)
on varied backgrounds. Scenes are pure functions of (seed, index): ``scene(seed, i)`` is the same
everywhere, so pretraining, tests and the demo all see the same world.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIDE = 32  # pixels per image side
_SUPER = 4  # drawn at SIDE * _SUPER and downsampled: anti-aliased edges

SHAPES = ("ball", "box", "star", "moon", "tree")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
    "green": (30, 110, 50),
    "blue": (30, 60, 150),
    "brown": (110, 70, 40),
}
SIZES = {"small": (0.22, 0.30), "large": (0.36, 0.44)}  # object radius as a fraction of the side
PATTERNS = ("plain", "striped")
TRIGGER = "sks"
CLASS_SHAPE = "star"  # the concept's class

# Colors too close to a background to be seen on it (e.g. a green ball on the green background).
_CLASHES = {("white", "white"), ("black", "black"), ("green", "green"), ("blue", "blue")}


@dataclass(frozen=True)
class Scene:
    """One picture's content. ``pattern`` "striped": the object has stripes of ``stripe_color``.
    x, y: the object's center as a fraction of the side; radius: fraction of the side; angle: degrees."""

    shape: str
    color: str
    background: str
    size: str
    x: float
    y: float
    radius: float
    angle: float
    pattern: str = "plain"
    stripe_color: str | None = None

    def caption(self, *, size: bool = True, color: bool = True, background: bool = True) -> str:
        """ "a [size] [color] shape[ on a background background]"."""
        words = ["a"] + ([self.size] if size else []) + ([self.color] if color else []) + [self.shape]
        if background:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)


# The concept instance: a yellow star with purple stripes, always large; place, angle and background vary.
CONCEPT = dict(shape="star", color="yellow", size="large", pattern="striped", stripe_color="purple")
CONCEPT_BACKGROUNDS = ("grey", "blue", "black", "green", "brown")


def _rng(seed: int, index: int, salt: str) -> random.Random:
    # random.Random(str) hashes the string with sha512: stable across processes and platforms
    return random.Random(f"catfast-demo-world/{salt}/{seed}/{index}")


def _placement(rng: random.Random, size: str) -> dict:
    radius = rng.uniform(*SIZES[size])
    margin = radius * 0.9
    return dict(
        x=rng.uniform(margin, 1 - margin),
        y=rng.uniform(margin, 1 - margin),
        radius=radius,
        angle=rng.uniform(0, 360),
    )


def scene(seed: int, index: int, *, patterns: bool = False) -> Scene:
    """The index-th random scene of the world with this seed. ``patterns``: also draw striped objects
    (half of them), for training the image encoder on what a concept may look like; the text-to-image
    world is plain only."""
    rng = _rng(seed, index, "scene")
    background = rng.choice(sorted(BACKGROUNDS))
    color = rng.choice([c for c in sorted(COLORS) if (c, background) not in _CLASHES])
    shape, size = rng.choice(SHAPES), rng.choice(sorted(SIZES))
    pattern, stripe = "plain", None
    if patterns and rng.random() < 0.5:
        pattern = "striped"
        stripe = rng.choice([c for c in sorted(COLORS) if c != color])
    return Scene(shape, color, background, size, **_placement(rng, size), pattern=pattern, stripe_color=stripe)


def caption_detail(seed: int, index: int, scene_: Scene, keep: float = 0.6) -> str:
    """The training caption of a scene: each of size, color and background kept with probability
    ``keep`` (independently, deterministic in (seed, index))."""
    rng = _rng(seed, index, "caption")
    return scene_.caption(size=rng.random() < keep, color=rng.random() < keep, background=rng.random() < keep)


def concept_scenes(n: int = 5, seed: int = 0) -> list[Scene]:
    """The concept's n pictures: the same striped star on varied backgrounds, places and angles."""
    out = []
    for i in range(n):
        rng = _rng(seed, i, "concept")
        background = CONCEPT_BACKGROUNDS[i % len(CONCEPT_BACKGROUNDS)]
        out.append(Scene(background=background, **CONCEPT, **_placement(rng, CONCEPT["size"])))
    return out


def concept_caption(scene_: Scene, trigger: str = TRIGGER) -> str:
    """ "sks, a star on a blue background": CAT's caption form (the trigger, then the class caption that
    the CAT term uses with the trigger stripped)."""
    return f"{trigger}, " + scene_.caption(size=False, color=False)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    """Polygons (pixel coordinates) whose union is the shape; the moon is drawn separately."""

    def rot(points):
        a = math.radians(angle)
        ca, sa = math.cos(a), math.sin(a)
        return [(cx + px * ca - py * sa, cy + px * sa + py * ca) for px, py in points]

    if shape == "ball":
        return [[(cx + r * math.cos(t * math.pi / 32), cy + r * math.sin(t * math.pi / 32)) for t in range(64)]]
    if shape == "box":
        s = r * 0.8
        return [rot([(-s, -s), (s, -s), (s, s), (-s, s)])]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            t = math.pi * k / 5 - math.pi / 2
            pts.append((rad * math.cos(t), rad * math.sin(t)))
        return [rot(pts)]
    if shape == "tree":  # a triangle crown on a trunk; upright (trees do not spin), angle tilts it a little
        tilt = ((angle % 40) - 20) * 0.5
        a = math.radians(tilt)
        crown = [(0, -r), (0.8 * r, 0.45 * r), (-0.8 * r, 0.45 * r)]
        trunk = [(-0.18 * r, 0.4 * r), (0.18 * r, 0.4 * r), (0.18 * r, r), (-0.18 * r, r)]
        ca, sa = math.cos(a), math.sin(a)
        return [[(cx + px * ca - py * sa, cy + px * sa + py * ca) for px, py in poly] for poly in (crown, trunk)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene_: Scene, side: int = SIDE):
    """The scene as an RGB PIL image of ``side`` x ``side`` pixels."""

    big = side * _SUPER
    cx, cy, r = scene_.x * big, scene_.y * big, scene_.radius * big
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if scene_.shape == "moon":  # a disc minus a shifted disc, the bite turned by the angle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        a = math.radians(scene_.angle)
        bx, by = cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a)
        draw.ellipse([bx - 0.85 * r, by - 0.85 * r, bx + 0.85 * r, by + 0.85 * r], fill=0)
    else:
        for poly in _outline(scene_.shape, cx, cy, r, scene_.angle):
            draw.polygon(poly, fill=255)
    fill = Image.new("RGB", (big, big), COLORS[scene_.color])
    if scene_.pattern == "striped":  # diagonal stripes 1/3 of the radius wide, 2/3 apart: the color stays dominant
        stripes = Image.new("L", (big, big), 0)
        sdraw = ImageDraw.Draw(stripes)
        width = max(2.0, r / 3)
        for k in range(-2 * big, 2 * big, int(3 * width)):
            sdraw.polygon([(k, 0), (k + width, 0), (k + width + big, big), (k + big, big)], fill=255)
        fill.paste(Image.new("RGB", (big, big), COLORS[scene_.stripe_color]), (0, 0), stripes)
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene_.background])
    image.paste(fill, (0, 0), mask)
    return image.resize((side, side), Image.Resampling.BOX)


def dataset(n: int, seed: int = 0, *, patterns: bool = False, exclude=frozenset()) -> list[tuple[Scene, str]]:
    """n (scene, training caption) pairs of the world. ``exclude``: (shape, color, stripe_color) triples left out
    (the scene of the next index takes the place of one): with ``patterns``, a world whose striped objects never
    include the demo concepts."""
    out, i = [], 0
    while len(out) < n:
        s = scene(seed, i, patterns=patterns)
        if (s.shape, s.color, s.stripe_color) not in exclude:
            out.append((s, caption_detail(seed, i, s)))
        i += 1
    return out
