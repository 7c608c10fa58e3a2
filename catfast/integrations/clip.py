"""CLIP models from local folders (transformers), for evaluation: load one with its image processor and
tokenizer, or write a tiny random one for tests. Never reaches the hub."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from catfast.errors import CatfastError
from catfast.folders import check_target, staged_folder
from catfast.integrations.tokenizer import BOS, EOS, build_tokenizer, save_tokenizer, vocab_and_merges

_CLIP_FILES = {
    "config.json": "the model config",
    "preprocessor_config.json": "the CLIPImageProcessor config",
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either one lets CLIPTokenizer load


def load_clip_parts(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple:
    """(model, image processor, tokenizer) from a LOCAL folder holding a transformers CLIPModel (config.json +
    safetensors weights), its CLIPImageProcessor (preprocessor_config.json) and CLIP tokenizer, e.g.
    ``openai/clip-vit-base-patch32`` downloaded with ``huggingface-cli download``. Never reaches the hub;
    a missing or incomplete folder raises CatfastError naming what is missing."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer  # lazy: transformers

    folder = Path(path)
    if not folder.is_dir():
        raise CatfastError(f"{folder}: no such CLIP folder (give a local folder with a transformers CLIPModel)")
    for name, what in _CLIP_FILES.items():
        if not (folder / name).is_file():
            raise CatfastError(f"{folder}: not a complete CLIP folder: {name} ({what}) is missing")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CatfastError(f"{folder}: not a complete CLIP folder: no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    if not any(folder.glob("*.safetensors")):
        raise CatfastError(f"{folder}: not a complete CLIP folder: no .safetensors weights (pickle is refused)")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types for bad folders
        raise CatfastError(f"{folder}: cannot load the CLIP model: {type(e).__name__}: {e}") from None
    return model.to(device), processor, tokenizer


def make_tiny_clip(path: str | os.PathLike, seed: int = 0, *, image_size: int = 32) -> Path:
    """Write a tiny random-weight CLIP folder (model, image processor at ``image_size`` px, catfast's
    offline tokenizer) that ``load_clip`` loads; for tests. Written beside ``path`` and renamed in."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # lazy: transformers

    vocab = vocab_and_merges()[0]
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    out = Path(path).absolute()
    check_target(out, False, CatfastError)
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        save_tokenizer(build_tokenizer(), tmp)
    return out
