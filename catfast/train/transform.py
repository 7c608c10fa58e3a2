"""The image transform of training data: one image -> its pixel variants of one size (resize, crops, flips,
aspect buckets), the pixel tensors whose VAE latents `catfast.train.cache` stores.

Transform (one image -> its variants, all of one size):
- Target size: ``resolution x resolution``, or with ``buckets`` the aspect bucket (below).
- The image (EXIF orientation applied) is resized (Lanczos) to the smallest size that covers the
  target, keeping its aspect ratio, then cropped to the target: centered with ``center_crop``, else
  ``crop_variants`` crops at offsets drawn from the image's own hash (so the cache stays valid across
  runs and seeds; identical offsets are kept once). ``random_flip`` adds the mirror of every crop.
  Variant ``v`` is crop ``v // F``, flipped when ``F == 2 and v % 2 == 1`` (F = 2 with flips, else 1).
- An image smaller than its target (it would be upscaled) is refused with a CatfastError naming the
  file and both sizes, unless ``allow_upscale``.

Aspect buckets (kohya-style): with step ``s`` (pixels; `bucket_step`: 8 x the VAE's scale factor, and
at least what the UNet's downsampling needs, so 64 for SD1.5/SDXL), the buckets are every ``(w, h)``
with ``w`` a multiple of ``s`` in ``[min_side, max_side]`` and ``h = floor(R^2 / w / s) * s`` in the
same range, and their transposes (area <= R^2, ``min_side = max(s, floor(R/2 / s) * s)``,
``max_side = 2R`` rounded down to ``s``). An image goes to the bucket of closest aspect ratio (in log
space) among the buckets that fit inside it (no upscaling); when none fits, to the closest bucket
overall, which needs ``allow_upscale``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from catfast.errors import CatfastError


@dataclass(frozen=True)
class Transform:
    """How an image becomes training pixels (see the module docstring). ``crop_variants`` random crops
    are cached per image when not ``center_crop`` (it must be 1 with ``center_crop``);
    ``allow_upscale`` accepts images smaller than their target size."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    buckets: bool = False
    crop_variants: int = 1
    allow_upscale: bool = False

    def __post_init__(self):
        if self.resolution < 8:
            raise CatfastError(f"resolution must be at least 8 pixels, got {self.resolution}")
        if self.crop_variants < 1:
            raise CatfastError(f"crop_variants must be >= 1, got {self.crop_variants}")
        if self.center_crop and self.crop_variants != 1:
            raise CatfastError(
                f"crop_variants={self.crop_variants} needs random crops; turn center_crop off or use 1 variant"
            )

    def key(self) -> str:
        """Stable string of every field that changes the pixels (allow_upscale does not: it only decides
        whether an upscaled image is an error). Bump the version when the transform's code changes."""
        return (
            f"v1;res={self.resolution};center={int(self.center_crop)};flip={int(self.random_flip)};"
            f"buckets={int(self.buckets)};crops={self.crop_variants};resample=lanczos"
        )


@dataclass(frozen=True)
class ImagePlan:
    """Where one image's variants come from. Sizes are (width, height) in pixels: ``original`` the
    image's, ``resized`` after the cover-resize, ``target`` the bucket (or square) size. ``variants``
    holds (left, top, flipped) per variant; left/top index the crop in the resized image."""

    original: tuple[int, int]
    resized: tuple[int, int]
    target: tuple[int, int]
    variants: tuple[tuple[int, int, bool], ...]


def bucket_step(base) -> int:
    """Pixels per bucket side step: 8 x the VAE's scale factor, and at least the multiple the UNet's
    downsampling needs (64 for SD1.5, SDXL and small; 16 for tiny)."""
    return max(8 * base.vae_scale_factor, size_multiple(base))


def size_multiple(base) -> int:
    """Image sides must be multiples of this: VAE scale factor x the UNet's total downsampling."""
    return base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every aspect bucket (width, height) for ``resolution`` with sides multiples of ``step``, sorted."""
    area = resolution * resolution
    min_side = max(step, (resolution // 2) // step * step)
    max_side = max(min_side, (2 * resolution) // step * step)
    buckets = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            buckets |= {(w, h), (h, w)}
    return sorted(buckets)


def plan_image(path: Path, size: tuple[int, int], transform: Transform, step: int, digest: str) -> ImagePlan:
    """The ImagePlan of an image of ``size`` (w, h). ``step`` is `bucket_step` (bucket sides) and
    ``digest`` the hex hash of the image bytes (it seeds the random crop offsets). Raises CatfastError
    naming the file and both sizes when the image would be upscaled and not ``transform.allow_upscale``."""
    w, h = size
    if transform.buckets:
        target = _choose_bucket(size, bucket_sizes(transform.resolution, step))
    else:
        target = (transform.resolution, transform.resolution)
    scale = max(target[0] / w, target[1] / h)
    if scale > 1 and not transform.allow_upscale:
        kind = "its aspect bucket" if transform.buckets else "the training resolution"
        raise CatfastError(
            f"{path}: image is {w}x{h} pixels, smaller than {kind} {target[0]}x{target[1]} "
            f"(resolution {transform.resolution}); use a larger image, a lower resolution, or allow_upscale "
            "(--allow-upscale) to enlarge it"
        )
    # round, but never below the target (float error could leave the cover one pixel short)
    resized = (max(target[0], round(w * scale)), max(target[1], round(h * scale)))
    slack = (resized[0] - target[0], resized[1] - target[1])
    if transform.center_crop:
        crops = [(slack[0] // 2, slack[1] // 2)]
    else:
        rng = random.Random(f"catfast-crop:{digest}:{transform.key()}")
        crops = []
        for _ in range(transform.crop_variants):
            crop = (rng.randint(0, slack[0]), rng.randint(0, slack[1]))
            if crop not in crops:
                crops.append(crop)
    flips = (False, True) if transform.random_flip else (False,)
    variants = tuple((left, top, flip) for left, top in crops for flip in flips)
    return ImagePlan(original=(w, h), resized=resized, target=target, variants=variants)


def _choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """Closest aspect ratio (log space) among buckets that fit in ``size``; else among all buckets."""
    w, h = size
    fitting = [b for b in buckets if b[0] <= w and b[1] <= h] or buckets
    aspect = math.log(w / h)
    return min(fitting, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def render(image, plan: ImagePlan) -> torch.Tensor:
    """The variants of ``image`` (an RGB PIL image of size ``plan.original``) as ``[V, 3, H, W]`` fp32
    pixels in [-1, 1], H x W = the target size."""

    resized = image.resize(plan.resized, Image.LANCZOS)
    tw, th = plan.target
    out = []
    for left, top, flip in plan.variants:
        crop = resized.crop((left, top, left + tw, top + th))
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(th, tw, 3)
        out.append(pixels.permute(2, 0, 1))
    return torch.stack(out).float().div(127.5).sub(1.0)


def sdxl_time_ids(plan: ImagePlan) -> torch.Tensor:
    """SDXL's micro-conditioning per variant, ``[V, 6]`` = (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w) as in diffusers' SDXL training script; a flipped crop's left is mirrored."""
    (ow, oh), (rw, _), (tw, th) = plan.original, plan.resized, plan.target
    rows = [[oh, ow, top, (rw - left - tw) if flip else left, th, tw] for left, top, flip in plan.variants]
    return torch.tensor(rows, dtype=torch.float32)
