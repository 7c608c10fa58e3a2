"""E4T's two pre-trained parts for the demo world, and where the shipped ones are.

- ``ConceptEncoder``: one 32 px picture -> the offset of the concept's word embedding from its class
  word's embedding: ``v* = v_class + E(x)`` ([N, D], D = the text encoder's hidden size, 64 for the demo
  model). Its trunk has the demo attribute encoder's CNN structure (``catfast.demo.encoder.AttributeNet``)
  and starts from its weights; a two-layer head (LeakyReLU, as E4T's) maps the pooled features to D.
  E4T's encoder also reads pooled UNet-encoder features of the noisy latent; this one reads the picture
  only (docs/e4t.md says why).
- The domain weight offsets: a LoRA (rank ``DOMAIN_RANK``) on to_q/to_k/to_v/to_out.0 of every attention
  of the UNet, stored as an ordinary diffusers-format LoRA file. E4T's offsets are multiplicative
  (``W * (1 + dW)``); additive low-rank offsets are what catfast's LoRA machinery (serving, merge, ONNX
  export) carries, as E4T's domain-agnostic follow-up also uses.

Shipped files (catfast/e4t/assets/, with a size + sha256 MANIFEST.json checked before use):
``encoder.safetensors`` (fp16), ``domain.safetensors`` (fp16 LoRA), ``pretrain.json`` (command, settings,
held-out concepts, time).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save
from torch import nn

from catfast.demo.encoder import AttributeNet
from catfast.errors import CatfastError
from catfast.folders import write_atomic
from catfast.shipped import check_assets

ASSETS = Path(__file__).parent / "assets"
ENCODER_FILE = "encoder.safetensors"
DOMAIN_FILE = "domain.safetensors"
RECORD_FILE = "pretrain.json"
DOMAIN_RANK = 4
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ConceptEncoder(nn.Module):
    """[N, 3, 32, 32] pictures in [-1, 1] -> [N, dim] embedding offsets (module docstring). The trunk's
    batch norms always use their running statistics (one picture at a time at personalization)."""

    def __init__(self, dim: int = 64, width: int = 24, hidden: int = 128):
        super().__init__()
        self.trunk = AttributeNet(width).features
        self.head = nn.Sequential(nn.Linear(4 * width, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, dim))
        with torch.no_grad():
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()
        self.trunk.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def init_trunk_from(self, attribute_net: nn.Module) -> None:
        """Copy the demo attribute encoder's CNN weights (and batch-norm statistics) into the trunk."""
        self.trunk.load_state_dict(attribute_net.features.state_dict())


def save_encoder(encoder: ConceptEncoder, path: str | os.PathLike) -> None:
    """fp16 safetensors with the encoder's shape in the metadata, written atomically."""
    dim = encoder.head[-1].out_features
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in encoder.state_dict().items()}
    write_atomic(path, save(state, {"dim": str(dim), "hidden": str(encoder.head[0].out_features)}))


def load_encoder(path: str | os.PathLike) -> ConceptEncoder:
    """The ConceptEncoder in ``path`` (fp32, eval mode); a missing or damaged file raises CatfastError
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise CatfastError(f"{path}: the E4T image encoder is missing (reinstall catfast)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        encoder = ConceptEncoder(dim=int(meta["dim"]), hidden=int(meta["hidden"]))
        state = load(path.read_bytes())
        encoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except Exception as e:  # safetensors / int() / load_state_dict raise several types for damaged files
        raise CatfastError(f"{path}: the E4T image encoder is damaged ({type(e).__name__}: {e}); reinstall catfast")
    return encoder.eval()


def check_shipped(root: str | os.PathLike | None = None) -> Path:
    """The E4T assets folder (default the shipped one) after checking every file against its manifest;
    CatfastError names the first missing, truncated or changed file."""
    root = Path(root or ASSETS)
    check_assets(root)
    return root
