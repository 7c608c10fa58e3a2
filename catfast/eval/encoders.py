"""Image/text encoders for evaluation: the protocol KPS needs and a CLIP model from a local folder (loaded by
``catfast.integrations.clip``, which also writes the tiny random CLIP folder of the tests; no hub anywhere)."""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch

from catfast.integrations.clip import load_clip_parts, make_tiny_clip

__all__ = ["ClipEncoder", "ImageTextEncoder", "load_clip", "make_tiny_clip"]


@runtime_checkable
class ImageTextEncoder(Protocol):
    """Embeds images and texts into one space. Both return fp32 ``[N, D]`` rows of unit L2 norm on the
    CPU, so a dot product is a cosine similarity. An image-only encoder (a domain classifier) may raise
    in ``embed_texts``; KPS then reports no prompt similarity."""

    def embed_images(self, images: list) -> torch.Tensor: ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...


class ClipEncoder:
    """A transformers ``CLIPModel`` with its image processor and tokenizer (``get_image_features`` /
    ``get_text_features``, the projected embeddings, as the CAT repo's eval utils use)."""

    def __init__(self, model, processor, tokenizer, *, batch_size: int = 32):
        self.model, self.processor, self.tokenizer = model.eval(), processor, tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.model.device))))
        return _normalized(out, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            ).to(self.model.device)
            out.append(_features(self.model.get_text_features(**tokens)))
        return _normalized(out, self.model.config.projection_dim)


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected embeddings; 5 returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalized(chunks: list[torch.Tensor], dim: int) -> torch.Tensor:
    if not chunks:
        return torch.zeros(0, dim)
    return torch.nn.functional.normalize(torch.cat(chunks).float().cpu(), dim=-1)


def load_clip(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ClipEncoder:
    """A ``ClipEncoder`` from a LOCAL folder holding a transformers CLIPModel (``integrations.clip.load_clip_parts``
    says what it needs); a missing or incomplete folder raises CatfastError naming what is missing."""
    return ClipEncoder(*load_clip_parts(path, device=device))
