"""`TrainConfig`: every option of `catfast train`, with the CAT paper's defaults, loaded from a TOML,
YAML or JSON file and overridden by command-line flags.

Defaults follow the official CAT configs (docs/method.md, §1): LoRA on to_q/to_k/to_v/to_out.0 of
every attention, rank 1 with alpha = rank, AdamW lr 1e-4 (betas 0.9/0.999, eps 1e-8, weight decay
1e-2), constant lr, batch 1, seed 42, cat_weight 1.0, random crop + flip, clip norm 1.0 (applied to
the LoRA parameters), 900 steps with a checkpoint every 150 (every checkpoint kept). Rank, lr, batch
size and steps follow the base (`recipe_for`): on the shipped demo model (``--base demo``) they are the
demo's recipe (rank 16, lr 1e-3, batch 4, 300 steps; the paper's rank 1 / lr 1e-4 learned nothing there
in 300 steps), on a diffusion transformer's pipeline folder (Flux, SD3, Qwen-Image: `dit_family`) the DiT
recipe (rank 16, lr 1e-4, batch 1, 500 steps) and the family's LoRA targets; a value given in a flag,
``--set`` or the config file wins. The recipes, `recipe_for` and `dit_family` are in train/recipes.py.

A config file is flat (``rank = 4``; dashes and underscores both work) and may hold a list of
concepts for a multi-concept run::

    base = "models/sd15"
    out = "runs/statue"
    [[concepts]]
    data = "data/statue"
    trigger = "shs"

`result_settings()` lists the settings that change the trained adapter; `--resume` compares them
with the checkpoint's and names the keys that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catfast.errors import CatfastError
from catfast.targets import ATTENTION_PROJECTIONS, PRESETS, expand_targets, split_targets
from catfast.train.recipes import dit_family, recipe_for

LR_SCHEDULES = ("constant", "cosine", "linear")
TIMESTEP_DISTRIBUTIONS = ("uniform", "chain-of-forgetting")
MIXED_PRECISION = ("no", "bf16", "fp16")
FORMATS = ("diffusers", "kohya")
BAD_IMAGE_POLICIES = ("stop", "skip")
CONCEPT_ADAPTERS = ("per-concept", "shared")
# auto: on a GPU (one process) the run times both over its first steps and keeps the faster (train/mode_trial.py),
# elsewhere objective.auto_mode's measured rule; measure: the timing on any device
MODES = ("auto", "fused", "reference", "measure")
# auto: the frozen base in the mixed precision's dtype; fp8: a DiT base's frozen Linears as float8 e4m3 with
# per-output-channel scales (catfast/nn/fp8_linear.py), about half of bf16's bytes
BASE_DTYPES = ("auto", "fp8")
DEVICES = ("auto", "cpu", "cuda")

# Settings that do not change the trained adapter: where things go, how often files are written, what
# the samples look like, and the device. `steps` matters only through a decaying lr schedule (below).
_NOT_RESULT = {
    "out",
    "cache_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_prompts",
    "sample_steps",
    "sample_guidance",
    "sample_seed",
    "sample_base",
    "format",
    "device",
    "allow_upscale",  # only decides whether a small image is refused; the pixels of an accepted one are the same
}


_RETENTION_DEFAULTS = dict(cat_prompts="stripped", bank=None, bank_ratio=0.2, bank_weight=0.1, keep=[], keep_weight=1.0)


class ConfigError(CatfastError):
    """A config file or option is unreadable, unknown or out of range."""


@dataclass(frozen=True)
class ConceptConfig:
    """One concept: a folder of images (+ captions) and the trigger word its captions carry."""

    data: str
    trigger: str


@dataclass
class TrainConfig:
    """Every `catfast train` option. ``concepts`` is derived from ``data``/``trigger`` when not given."""

    # what to train on
    base: str | None = None
    base_config: str | None = None  # the diffusers folder that completes a single UNet file given as base
    data: str | None = None
    trigger: str | None = None
    concepts: list[ConceptConfig] = field(default_factory=list)
    concept_adapters: str = "per-concept"  # several concepts: one adapter each, or one shared adapter
    out: str | None = None
    # adapter
    rank: int | None = None  # None: the base's recipe (recipe_for)
    alpha: float | None = None  # None: alpha = rank (scale 1, as diffusers' LoRAAttnProcessor of the paper)
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))  # or a preset (PRESETS)
    # objective
    cat_weight: float = 1.0
    caption_dropout: float = 0.0  # share of concept rows whose LDM term sees the empty caption (kohya's rate)
    snr_gamma: float | None = None
    timesteps: str = "uniform"
    timestep_power: float = 1.0  # chain-of-forgetting: P(t) proportional to (t + 1) ** timestep_power
    mode: str = "auto"
    # retention (catfast.train.retention; docs/retention.md): all off by default
    cat_prompts: str = "stripped"  # stripped | stripped+empty | a file of extra preservation prompts
    bank: str | None = None  # a knowledge bank folder (`catfast bank make`)
    bank_ratio: float = 0.2  # bank rows' share of the rows with a data target (Diff-Tuning's LWF_ratio)
    bank_weight: float = 0.1  # weight of the bank term (Diff-Tuning's LWF_weight)
    keep: list[str] = field(default_factory=list)  # adapters kept frozen and distilled (lifelong)
    keep_weight: float = 1.0  # weight of the kept adapters' distillation term
    # optimization
    steps: int | None = None  # None: the base's recipe
    lr: float | None = None  # None: the base's recipe
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int | None = None  # None: the base's recipe
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    base_dtype: str = "auto"  # auto | fp8 (DiT bases: frozen Linears stored as float8 e4m3)
    gradient_checkpointing: bool = False
    cuda_graphs: bool = False  # capture the whole step per batch shape (catfast/train/graphs.py); CUDA only
    seed: int = 42
    # data
    resolution: int | None = None  # None: the UNet's native size
    center_crop: bool = False
    random_flip: bool | None = None  # None: the base's recipe (recipe_for): off on the demo base, else on
    crop_variants: int = 4
    buckets: bool = False
    prepend_trigger: bool = False
    on_bad_image: str = "stop"
    allow_upscale: bool = False  # accept images smaller than the training size (enlarged)
    cache_dir: str | None = None  # None: OUT/cache
    # output
    checkpoint_every: int = 150
    keep_checkpoints: int = 0  # the newest N checkpoints are kept; 0: all
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)  # None given: the first stripped captions
    sample_steps: int = 25
    sample_guidance: float = 7.5
    sample_seed: int = 0
    sample_base: bool = True  # a base-model column next to the adapter's
    format: str = "diffusers"
    device: str = "auto"

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """A config from plain values (file contents); keys may use dashes. Unknown keys -> ConfigError."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        valid = cls.field_names()
        unknown = sorted(k for k in values if k not in valid)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        converted = {k: _convert(k, v, kinds[k], source) for k, v in values.items()}
        return cls(**converted)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The file's settings (TOML, YAML or JSON by suffix), then ``overrides`` (values that are None are
        not set), validated."""
        values = read_config_file(path) if path is not None else {}
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key.replace("-", "_")] = value
        config = cls.from_dict(values, source=str(path) if path is not None else "options")
        config.validate()
        return config

    def validate(self) -> None:
        """Fill ``concepts`` from data/trigger and check every option; ConfigError names the bad one."""
        if self.base is None:
            raise ConfigError("no base model: pass --base PATH (a diffusers folder) or set base in the config file")
        if self.out is None:
            raise ConfigError("no output folder: pass --out DIR or set out in the config file")
        if not self.concepts:
            self.concepts = self._data_concepts()
        elif (self.data is not None or self.trigger is not None) and (
            self.data is None or self.concepts != self._data_concepts()
        ):
            raise ConfigError("give either data/trigger or a concepts list, not both")
        _, recipe = recipe_for(self.base)
        filled = [k for k, v in recipe.items() if getattr(self, k) is None]
        for key in filled:
            setattr(self, key, recipe[key])
        if filled:  # a second validate() finds nothing to fill and keeps what the first one recorded
            self._from_recipe = filled
        family = dit_family(self.base)
        named = split_targets(self.targets)
        if family is not None and "locon" in named:
            raise ConfigError(
                f"targets 'locon' adds a UNet's convolutions; a {family.name} transformer has none (its LoRA "
                "targets are linear layers): leave targets unset for the family's own"
            )
        self.targets = expand_targets(named)
        if family is not None and self.targets == list(ATTENTION_PROJECTIONS):
            # the UNet default stands for "the base's default": on a DiT, the family's trainers' targets
            self.targets = list(family.default_targets)
        triggers = [c.trigger for c in self.concepts]
        if any(not t.strip() for t in triggers):
            raise ConfigError("a trigger word must not be empty")
        if len(set(triggers)) != len(triggers):
            raise ConfigError(f"concepts need distinct triggers, got {triggers}")
        for name, choices in (
            ("lr_schedule", LR_SCHEDULES),
            ("timesteps", TIMESTEP_DISTRIBUTIONS),
            ("mixed_precision", MIXED_PRECISION),
            ("format", FORMATS),
            ("on_bad_image", BAD_IMAGE_POLICIES),
            ("concept_adapters", CONCEPT_ADAPTERS),
            ("mode", MODES),
            ("device", DEVICES),
            ("base_dtype", BASE_DTYPES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name, low in (
            ("rank", 1),
            ("steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("crop_variants", 1),
            ("keep_checkpoints", 0),
            ("sample_steps", 1),
            ("warmup_steps", 0),
            ("checkpoint_every", 0),
            ("sample_every", 0),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "cat_weight", "weight_decay", "adam_eps", "bank_weight", "keep_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("snr_gamma", "max_grad_norm", "alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be > 0 (or unset), got {value}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if not self.targets:
            raise ConfigError(f"targets must name at least one module (e.g. to_q) or a preset ({', '.join(PRESETS)})")
        if not (0 <= self.caption_dropout < 1):
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not (0 < self.bank_ratio < 1):
            raise ConfigError(f"bank_ratio must be in (0, 1), got {self.bank_ratio}")
        if not self.cat_prompts.strip():
            raise ConfigError("cat_prompts must be stripped, stripped+empty or a prompt file, got an empty value")
        if self.cat_prompts != "stripped" and self.cat_weight == 0:
            raise ConfigError(f"cat_prompts {self.cat_prompts!r} adds CAT prompts, but cat_weight is 0 (no CAT term)")
        if self.base_dtype == "fp8":
            if family is None:
                raise ConfigError("base_dtype fp8 is for DiT bases (a Flux, SD3 or Qwen-Image pipeline folder); "
                                  "a UNet base trains in its mixed precision: leave base_dtype auto")  # fmt: skip
            from catfast.ops.fp8 import require_fp8  # lazy: torch

            require_fp8()

    def _data_concepts(self) -> list[ConceptConfig]:
        """The concepts ``data``/``trigger`` give: one, or for a kohya-style data folder (``N_trigger class``
        subfolders) one per trigger its subfolders name (``trigger`` may then be left out)."""
        if self.data is None:
            raise ConfigError("no training data: pass --data DIR and --trigger WORD (or a concepts list)")
        from catfast.train.data import kohya_triggers  # lazy: startup

        triggers = kohya_triggers(Path(self.data), self.trigger)
        if triggers is None:
            if self.trigger is None:
                raise ConfigError(
                    "no trigger: pass --trigger WORD (only a kohya-style --data folder of N_trigger class "
                    "subfolders names its triggers itself)"
                )
            triggers = [self.trigger]
        return [ConceptConfig(self.data, t) for t in triggers]

    # ---------------------------------------------------------------------------------- identity

    def describe(self) -> str:
        """One line of what the run trains with, and which of those values are the base's defaults."""
        name, recipe = recipe_for(self.base)
        filled = getattr(self, "_from_recipe", [])
        schedule = f"{self.lr_schedule}" + (f", {self.warmup_steps} warmup steps" if self.warmup_steps else "")
        accum = f" x {self.grad_accum} accumulated" if self.grad_accum > 1 else ""
        line = (
            f"training with rank {self.rank} (alpha {self.lora_alpha:g}), lr {self.lr:g} ({schedule}), batch "
            f"{self.batch_size}{accum}, {self.steps} steps, cat_weight {self.cat_weight:g}, "
            f"{len(self.concepts)} concept(s), targets {','.join(self.targets)}, random flip "
            f"{'on' if self.random_flip else 'off'}"
        )
        if filled:
            given = ", ".join(f"{k} {_shown(recipe[k])}" for k in filled)
            line += f"; defaults from {name}: {given} (flags, --set or --config override them)"
        return line

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (concepts as dicts)."""
        return dataclasses.asdict(self)

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the trained adapter (paths resolved). ``steps`` counts only under a
        decaying lr schedule: with a constant one, the first k steps do not depend on it."""
        values = {k: v for k, v in self.to_dict().items() if k not in _NOT_RESULT and k not in ("data", "trigger")}
        from catfast.integrations.models import base_location  # lazy: startup

        values["base"] = _resolved(base_location(self.base) if self.base is not None else None)
        values["base_config"] = _resolved(self.base_config)
        values["concepts"] = [{"data": _resolved(c.data), "trigger": c.trigger} for c in self.concepts]
        values["bank"], values["keep"] = _resolved(self.bank), [_resolved(k) for k in self.keep]
        if self.cat_prompts not in ("stripped", "stripped+empty"):
            values["cat_prompts"] = _resolved(self.cat_prompts)
        # retention settings and base_dtype left at their defaults are left out: checkpoints written before they
        # existed resume
        for key, default in {**_RETENTION_DEFAULTS, "base_dtype": "auto"}.items():
            if values[key] == default:
                del values[key]
        if self.lr_schedule == "constant":
            del values["steps"]
        return values

    def result_hash(self) -> str:
        """A stable hex digest of `result_settings()`."""
        blob = json.dumps(self.result_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differing_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every result setting that differs, sorted by key."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Key/value pairs of a .toml, .yaml/.yml or .json file (a table/mapping at the top)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
        if suffix == ".toml":
            import tomllib  # lazy: optional

            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # lazy: optional

            values = yaml.safe_load(text) or {}
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except Exception as e:  # tomllib/yaml/json each raise their own error types
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a table of options, got {type(values).__name__}")
    return values


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _shown(value: Any) -> str:
    """A recipe value as ``describe`` prints it: numbers in %g, booleans on/off."""
    return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"


def _convert(key: str, value: Any, kind: str, source: str) -> Any:
    """``value`` checked (and coerced where lossless) against the annotation string ``kind``."""
    if key == "concepts":
        if not isinstance(value, list):
            raise ConfigError(f"{source}: concepts must be a list of {{data, trigger}} tables")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, ConceptConfig):
                out.append(item)
                continue
            if not isinstance(item, dict) or set(item) != {"data", "trigger"}:
                raise ConfigError(f"{source}: concepts[{i}] must have exactly the keys data and trigger, got {item!r}")
            out.append(ConceptConfig(str(item["data"]), str(item["trigger"])))
        return out
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{source}: {key} cannot be empty")
    base = kind.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, (str, Path)):
                raise ValueError
            return str(value)
        if base == "list[str]":
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be {kind.replace(' | None', ' (or empty)')}, got {value!r}") from None
    raise AssertionError(f"no converter for {key}: {kind}")
