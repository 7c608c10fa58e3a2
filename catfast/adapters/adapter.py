"""In-memory LoRA adapters: one low-rank pair (down, up) and alpha per targeted module.

A layer contributes ``delta_W = (alpha / rank) * up @ down`` (flattened for convolutions) to the
module it targets. Layers are keyed by a component-qualified module path in diffusers' names, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``transformer.single_transformer_blocks.0.attn.to_q`` (Flux, SD3, Qwen-Image) or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``. Pure torch: no diffusers or peft.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from catfast.errors import AdapterFormatError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
DENOISERS = ("unet", "transformer")  # a pipeline's denoiser: families' `denoiser_key`

# Module names that only one transformer family has (diffusers' spelling), for `guess_family`: Flux's single
# blocks and embedders, Qwen-Image's per-stream MLP/modulation and embedders, SD3's patch embedding and SD3.5's
# second attention. All three name their blocks' attention transformer_blocks.N.attn.to_q, ...; Flux's double
# blocks and SD3's joint blocks also share attn.add_q_proj, ff_context, norm1_context.
_FAMILY_MARKS = {
    "flux": ("single_transformer_blocks.", "x_embedder", "guidance_embedder", "proj_mlp"),
    "qwenimage": (".img_mlp.", ".txt_mlp.", ".img_mod.", ".txt_mod.", "img_in", "txt_in"),
    "sd3": ("pos_embed.", ".attn2."),
}

# Top-level children of a CLIP text transformer. transformers 5 flattens CLIPTextModel (no
# `text_model.`) but not CLIPTextModelWithProjection; adapters always spell the `text_model.` form.
_CLIP_TEXT_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")

# A path part after which the module's own name starts (see `leaf_name`).
_OWNERS = {"mid_block", "attn1", "attn2", "attn", "self_attn", "mlp", "time_embedding", "add_embedding"}
_INDEXED_OWNERS = {"down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks", "layers"}
_INDEXED_OWNERS |= {"single_transformer_blocks"}
_INDEXED_OWNERS |= {"downsamplers", "upsamplers"}


@dataclass
class LoraLayer:
    """One LoRA pair. ``down`` (A): ``[r, in]`` or ``[r, in, kh, kw]``; ``up`` (B): ``[out, r]`` or
    ``[out, r, 1, 1]``. The layer adds ``scale * up @ down`` to the target's weight, ``scale = alpha / r``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        problem = pair_problem(self.down, self.up)
        if problem:
            raise AdapterFormatError(problem)
        self.alpha = float(self.alpha)
        if not math.isfinite(self.alpha):
            raise AdapterFormatError(f"alpha is {self.alpha}; it must be a finite number")

    def nonfinite(self) -> list[str]:
        """Which of ``down``/``up`` hold NaN or Inf (empty when all values are finite)."""
        return [name for name, t in (("down", self.down), ("up", self.up)) if not bool(torch.isfinite(t).all())]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def pair_problem(down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why (down, up) is not a LoRA pair, or None. Checks dimensions, that both agree on the rank, and
    that the rank is at least 1."""
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        return f"down {tuple(down.shape)} / up {tuple(up.shape)} must be 2-D (linear) or 4-D (conv)"
    if up.shape[1] != down.shape[0]:
        return f"rank mismatch: down {tuple(down.shape)} has rank {down.shape[0]}, up {tuple(up.shape)} {up.shape[1]}"
    if down.shape[0] == 0:  # alpha / rank would divide by zero
        return f"rank 0: down {tuple(down.shape)} / up {tuple(up.shape)} hold no LoRA pair"
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"up {tuple(up.shape)} must have a 1x1 kernel"
    return None


@dataclass
class LoraAdapter:
    """A set of LoRA layers keyed by component-qualified module path (see module docstring).

    ``metadata``: the file's free-form string metadata (e.g. kohya's ``ss_*`` keys), kept on write.
    ``source_format``: "peft", "diffusers" or "kohya" for a file read from disk, "memory" otherwise.
    ``path``: the file it was read from, if any (named in error messages).
    ``family``: the model family the file's format names (a kohya FLUX.1 file: "flux"), else None.
    """

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "memory"
    path: str | None = None
    family: str | None = None

    def component(self, name: str) -> dict[str, LoraLayer]:
        """The layers of one component ("unet", "text_encoder", ...) keyed by path without the prefix."""
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.layers.items() if k.startswith(prefix)}

    def components(self) -> list[str]:
        """Components that have at least one layer, in COMPONENTS order."""
        present = {split_key(k)[0] for k in self.layers}
        return [c for c in COMPONENTS if c in present]

    def num_parameters(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.layers.values())

    def check_finite(self) -> None:
        """Raise AdapterFormatError naming the first layers whose weights hold NaN or Inf (a diverged
        or damaged adapter: merged or served, it turns every output into NaN)."""
        bad = [f"{k} ({', '.join(p)})" for k, v in self.layers.items() if (p := v.nonfinite())]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise AdapterFormatError(
                f"{self.where()}: non-finite values (NaN or Inf) in {len(bad)} layer(s): {', '.join(bad[:3])}{more}"
            )

    def describe(self) -> dict:
        """Summary for ``catfast adapter info``: format ("diffusers" for both the peft and the old
        diffusers key style, or "kohya"), key style, components, the model family its module names
        point to (``guess_family``), per-layer rank and alpha, leaf targets (to_q, proj_in, ff.net.0.proj,
        ...), layer and parameter counts."""
        return {
            "format": format_name(self.source_format),
            "keys": KEY_STYLES.get(self.source_format, self.source_format),
            "components": self.components(),
            "family": guess_family(self),
            "num_layers": len(self.layers),
            "num_parameters": self.num_parameters(),
            "ranks": {k: v.rank for k, v in self.layers.items()},
            "alphas": {k: v.alpha for k, v in self.layers.items()},
            "targets": sorted({leaf_name(split_key(k)[1]) for k in self.layers}),
            "dtypes": sorted({str(v.down.dtype).removeprefix("torch.") for v in self.layers.values()}),
        }

    def where(self) -> str:
        """How error messages name this adapter."""
        return self.path if self.path else "<in-memory adapter>"


# The one user-facing name of each on-disk format: peft-style keys are diffusers' LoRA format too
# (what `pipe.load_lora_weights` reads and `write_adapter(format="diffusers")` writes).
KEY_STYLES = {"peft": "lora_A/lora_B", "diffusers": "lora.down/lora.up", "kohya": "lora_down/lora_up/alpha"}


def format_name(source_format: str) -> str:
    """The format name shown to users: "diffusers" for peft- and old diffusers-style keys, else as is."""
    return "diffusers" if source_format in ("peft", "diffusers") else source_format


def split_key(key: str) -> tuple[str, str]:
    """``"unet.down_blocks.0..."`` -> ``("unet", "down_blocks.0...")``."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise AdapterFormatError(f"layer key {key!r} must start with one of {', '.join(COMPONENTS)}")
    return component, path


def layer_key(component: str, path: str) -> str:
    """The canonical key of module ``path`` in ``component`` (text encoders get the ``text_model.`` form)."""
    if component.startswith("text_encoder") and path.startswith(_CLIP_TEXT_ROOTS):
        path = "text_model." + path
    return f"{component}.{path}"


def guess_family(adapter: LoraAdapter) -> str | None:
    """The model family an adapter's denoiser layers were made for: "unet" for UNet layers; for transformer
    layers the family the file's names told (``adapter.family``), else "flux", "sd3" or "qwenimage" when a
    module only that family has is targeted (`_FAMILY_MARKS`). None when the names do not tell: no denoiser
    layers, or only the blocks' attention projections, which all three name alike. A guess; attaching
    checks shapes."""
    if adapter.component("unet"):
        return "unet"
    if adapter.family:
        return adapter.family
    paths = ["." + p for p in adapter.component("transformer")]
    found = [family for family, marks in _FAMILY_MARKS.items() if any(m in p for p in paths for m in marks)]
    return found[0] if len(found) == 1 else None


def leaf_name(path: str) -> str:
    """The module's own name inside its block: ``...transformer_blocks.0.attn1.to_q`` -> ``to_q``,
    ``...transformer_blocks.0.ff.net.0.proj`` -> ``ff.net.0.proj``, ``...resnets.1.conv1`` -> ``conv1``."""
    parts = path.split(".")
    start = 0
    for i, part in enumerate(parts[:-1]):
        if part in _OWNERS or (part.isdigit() and i > 0 and parts[i - 1] in _INDEXED_OWNERS):
            start = i + 1
    return ".".join(parts[start:])


def most_common(values: list) -> object:
    """The most frequent value (ties: the first seen); the default of a rank/alpha pattern."""
    return Counter(values).most_common(1)[0][0]


def pattern_value(patterns: dict, module_path: str, default):
    """peft's rank_pattern/alpha_pattern lookup: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module_path)``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default
