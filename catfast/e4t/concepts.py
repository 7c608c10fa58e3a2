"""The demo world's concepts for E4T: every object the world can draw (shape, color, size, plain or striped
with a stripe color), the split into the concepts domain pre-training sees and the held-out ones the
measurements use, and several pictures ("views") of one concept on varied backgrounds and places.

There are 5 shapes x 9 colors x 2 sizes x (plain + 8 stripe colors) = 810 concepts. Held out: the three
objects of the shipped demo adapters (the striped star of ``catfast demo``, the tiger ball, the toy box)
and every concept whose name hashes into the last ``HELD_OUT_PERCENT`` (a pure function of the name, the
same everywhere).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from catfast.demo import world
from catfast.demo.adapters import CONCEPTS as DEMO_ADAPTER_CONCEPTS
from catfast.demo.adapters import concept_scenes

HELD_OUT_PERCENT = 10


@dataclass(frozen=True)
class Concept:
    """One object of the world: ``pattern`` "plain" (stripe_color None) or "striped"."""

    shape: str
    color: str
    size: str
    pattern: str = "plain"
    stripe_color: str | None = None

    @property
    def name(self) -> str:
        stripes = f"-{self.stripe_color}-stripes" if self.pattern == "striped" else ""
        return f"{self.size}-{self.color}-{self.shape}{stripes}"

    def fields(self) -> dict:
        return asdict(self)


def all_concepts() -> list[Concept]:
    out = []
    for shape in world.SHAPES:
        for color in world.COLORS:
            for size in world.SIZES:
                out.append(Concept(shape, color, size))
                out += [Concept(shape, color, size, "striped", s) for s in world.COLORS if s != color]
    return out


NAMED_HELD_OUT = {name: Concept(**fields) for name, (_, fields) in DEMO_ADAPTER_CONCEPTS.items()}


def is_held_out(concept: Concept) -> bool:
    if concept in NAMED_HELD_OUT.values():
        return True
    digest = hashlib.sha256(f"catfast-e4t/{concept.name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 >= 100 - HELD_OUT_PERCENT


def split() -> tuple[list[Concept], list[Concept]]:
    """(training concepts, held-out concepts)."""
    concepts = all_concepts()
    return [c for c in concepts if not is_held_out(c)], [c for c in concepts if is_held_out(c)]


def views(concept: Concept, n: int, seed: int = 0) -> list[world.Scene]:
    """n pictures of the concept: random backgrounds (not ones the color vanishes on), places, angles."""
    out = []
    for i in range(n):
        rng = world._rng(seed, i, f"e4t-view/{concept.name}")
        backgrounds = [b for b in sorted(world.BACKGROUNDS) if (concept.color, b) not in world._CLASHES]
        background = rng.choice(backgrounds)
        out.append(world.Scene(background=background, **concept.fields(), **world._placement(rng, concept.size)))
    return out


def reference_views(concept: Concept, n: int = 5) -> list[world.Scene]:
    """The pictures identity is measured against: the concept on the demo's concept backgrounds (as the
    shipped demo adapters' training pictures), the first of which is the one image E4T personalizes from."""
    return concept_scenes(concept.fields(), n)
