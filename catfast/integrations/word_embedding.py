"""The concept word embedding of an E4T adapter: checks of the words, injection while encoding, and the
embedding's place in an adapter file.

An E4T adapter is a plain LoRA file (UNet attention offsets) whose safetensors metadata also carries the
concept's word embedding v* (``EMBEDDING_KEY``: a JSON list of floats, the text encoder's hidden size) and
the placeholder word it stands for (``TOKEN_KEY``, one token of the base's tokenizer, e.g. "sks"). Readers
that only know LoRA load it as a LoRA; ``install_embedding`` writes v* into the row of that token in the
text encoder's token-embedding table, which is what the sampler, ``catfast serve`` and the ONNX export
need: a prompt with the placeholder word then means the concept. The row change is global to that text
encoder, so two adapters may share a base only with different placeholder words (refused otherwise).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

import torch

from catfast.errors import CatfastError

TOKEN_KEY = "catfast.e4t.token"
EMBEDDING_KEY = "catfast.integrations.word_embedding"
CLASS_KEY = "catfast.e4t.class"


def single_token(tokenizer, word: str, what: str = "class word") -> int:
    """The id of ``word`` when the tokenizer encodes it as exactly one token; CatfastError (naming the
    pieces) otherwise."""
    if not word or word != word.strip() or " " in word:
        raise CatfastError(f"{what} {word!r} must be one word without spaces")
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise CatfastError(
            f"{what} {word!r} is not one token of the text encoder's vocabulary (it splits into {len(ids)}: "
            f"{' '.join(pieces)}); choose a word the model knows as one token, such as 'star'"
        )
    return int(ids[0])


def token_table(text_encoder) -> torch.nn.Embedding:
    """The text encoder's token-embedding module (transformers' ``get_input_embeddings``)."""
    return text_encoder.get_input_embeddings()


@contextlib.contextmanager
def injected(text_encoder, token_id: int, vectors: torch.Tensor):
    """While active, every occurrence of ``token_id`` in row i of the text encoder's input ids embeds as
    ``vectors[i]`` ([B, D], or [D] for every row), with gradients flowing to ``vectors``: the text
    encoder's forward becomes a function of the concept embedding (E4T's v* in the prompt)."""
    table = token_table(text_encoder)

    def hook(module, args, out):
        ids = args[0]
        v = vectors if vectors.ndim == 2 else vectors.expand(ids.shape[0], -1)
        if v.shape[0] != ids.shape[0]:
            raise ValueError(f"{v.shape[0]} embeddings for {ids.shape[0]} prompts")
        mask = (ids == token_id).unsqueeze(-1)
        return torch.where(mask, v[:, None, :].to(out.dtype), out)

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(base, prompts: list[str], token_id: int | None = None, vectors: torch.Tensor | None = None):
    """The UNet's text condition [B, 77, D] of ``prompts`` (SD bases), with gradients: the placeholder
    ``token_id`` embedded as ``vectors`` when given."""
    from catfast.integrations.models import _tokens

    ids = _tokens(base.tokenizer, prompts, base.text_encoder.device)
    if token_id is None:
        return base.text_encoder(ids)[0]
    with injected(base.text_encoder, token_id, vectors):
        return base.text_encoder(ids)[0]


def embedding_metadata(token: str, vector: torch.Tensor, class_word: str) -> dict[str, str]:
    """The metadata entries that carry an E4T embedding in an adapter file."""
    values = [float(x) for x in vector.detach().float().cpu().flatten()]
    return {TOKEN_KEY: token, EMBEDDING_KEY: json.dumps(values), CLASS_KEY: class_word}


def read_embedding(metadata: Mapping[str, str], where: str = "adapter") -> tuple[str, torch.Tensor] | None:
    """(placeholder word, v* [D]) of an adapter's metadata, None when it is a plain LoRA; CatfastError
    when the entries are damaged."""
    if TOKEN_KEY not in metadata and EMBEDDING_KEY not in metadata:
        return None
    try:
        token = str(metadata[TOKEN_KEY])
        vector = torch.tensor(json.loads(metadata[EMBEDDING_KEY]), dtype=torch.float32)
        if vector.ndim != 1 or not bool(torch.isfinite(vector).all()):
            raise ValueError("not a finite 1-D list of numbers")
    except (KeyError, ValueError, TypeError) as e:
        raise CatfastError(f"{where}: damaged E4T embedding in the adapter's metadata ({e})") from None
    return token, vector


def install_embedding(text_encoder, tokenizer, token: str, vector: torch.Tensor, where: str = "adapter") -> tuple:
    """Write ``vector`` into the token-embedding row of ``token`` (in place, no gradients). Returns
    (table weight, row index, previous row) so a caller can restore it. CatfastError when the word is not
    one token or the hidden size differs."""
    token_id = single_token(tokenizer, token, "E4T placeholder word")
    weight = token_table(text_encoder).weight
    if vector.shape != weight.shape[1:]:
        raise CatfastError(
            f"{where}: the E4T embedding has {vector.numel()} values, but this text encoder's hidden size is "
            f"{weight.shape[1]} (the adapter was made for another base)"
        )
    previous = weight.detach()[token_id].clone()
    with torch.no_grad():
        weight[token_id] = vector.to(weight.dtype)
    return weight, token_id, previous


def install_from_metadata(text_encoder, tokenizer, metadata: Mapping[str, str], where: str = "adapter"):
    """``install_embedding`` for an adapter's metadata; None (nothing changed) for a plain LoRA."""
    found = read_embedding(metadata, where)
    if found is None:
        return None
    return install_embedding(text_encoder, tokenizer, *found, where=where)


@contextlib.contextmanager
def request_embeddings(base, entries):
    """While one serving request's prompts are encoded: the E4T embedding of each of its adapters
    (``entries``: (pool entry, weight) pairs; an entry's ``meta["e4t"]`` is ``read_embedding``'s result)
    replaces its placeholder word, for this request only. A weight scales the adapter's LoRA, not v*."""
    found = [e.meta.get("e4t") for e, w in entries if w != 0.0 and e.meta.get("e4t") is not None]
    with contextlib.ExitStack() as stack:
        for token, vector in found:
            token_id = single_token(base.tokenizer, token, "E4T placeholder word")
            stack.enter_context(injected(base.text_encoder, token_id, vector.to(base.text_encoder.device)))
        yield


def install_for_export(base, loaded, with_text_encoder: bool, log=lambda m: None) -> list:
    """Write the E4T embedding of every adapter in ``loaded`` ((spec, LoraAdapter) pairs of the ONNX
    export) into the base's token table, so the exported text encoder carries it (and is validated with
    it). Returns (row view, previous row) pairs to restore; CatfastError when two adapters put different
    embeddings on one placeholder word."""
    saved, owner = [], {}
    try:
        for spec, adapter in loaded:
            found = read_embedding(adapter.metadata, spec.label)
            if found is None:
                continue
            token, vector = found
            if token in owner and not torch.equal(owner[token][1], vector):
                raise CatfastError(
                    f"{spec.label} and {owner[token][0]} both carry an E4T embedding for {token!r}: export them "
                    "separately, or personalize one with another --token"
                )
            owner[token] = (spec.label, vector)
            weight, row, previous = install_embedding(base.text_encoder, base.tokenizer, token, vector, spec.label)
            saved.append((weight[row], previous))
            if with_text_encoder:
                log(f"{spec.label}: its E4T embedding for {token!r} is in the exported text encoder")
            else:
                log(
                    f"note: {spec.label} carries an E4T embedding for {token!r}, which lives in the text encoder: "
                    "export with --components unet,text_encoder,vae_decoder to keep it"
                )
    except BaseException:
        with torch.no_grad():
            for row, previous in reversed(saved):
                row.copy_(previous)
        raise
    return saved
