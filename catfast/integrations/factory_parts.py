"""Building blocks the model factories share (``factory``: UNets, ``factory_dit``: transformers,
``factory_qwen``: Qwen-Image's text side): seeded construction and the CLIP text config of catfast's offline
tokenizer."""

from __future__ import annotations

import torch

from catfast.integrations.tokenizer import BOS, EOS, vocab_and_merges


def seeded(seed: int, make):
    """``make()`` under ``torch.manual_seed(seed)``, the caller's global RNG state left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def clip_text_config(**sizes):
    """A transformers CLIPTextConfig for catfast's offline tokenizer (its vocabulary and special tokens,
    77 positions, quick_gelu), with ``sizes`` (hidden_size, num_hidden_layers, ...) on top."""
    from transformers import CLIPTextConfig  # lazy: transformers

    vocab = vocab_and_merges()[0]
    fields = dict(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextConfig(**{**fields, **sizes})
