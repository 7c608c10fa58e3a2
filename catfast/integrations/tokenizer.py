"""An offline CLIP tokenizer: a small byte-level BPE vocabulary generated in code, no hub.

Layout follows OpenAI CLIP's vocab.json: the 256 byte symbols, the same 256 with `</w>` (end of word),
then one token per learned merge, then `<|startoftext|>` and `<|endoftext|>` (the last two ids; pad =
end of text, as in SD1.5). The merges are learned (classic BPE) on a built-in list of common English and
captioning words until each of them is a single token, so captions stay short; any other text still
encodes, byte by byte at worst. Real CLIP has 49,408 tokens; this one has 1,113 (599 merges).
"""

from __future__ import annotations

import functools
import gzip
import json
from collections import Counter
from pathlib import Path

MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words that become single tokens. Order does not matter; the merges are learned deterministically.
_WORDS = """
a an the of and or in on at to from with by for as is are was be it its this that these those there
his her their our your my one two three four five some many few all no not very more most other
photo photograph picture image painting drawing sketch illustration render rendering portrait
closeup close up view shot style art artwork digital oil watercolor pencil ink anime cartoon
realistic detailed high quality resolution sharp focus lighting light dark bright soft studio
cinematic beautiful cute small large big tall old young new little huge tiny
cat cats dog dogs kitten puppy bird birds horse cow sheep fish animal animals lion tiger bear fox
man woman men women person people boy girl child children baby face hair eyes hand hands
statue sculpture toy doll robot car cars bike train boat plane house building city street road
bridge tower castle room kitchen bedroom table chair sofa bed carpet rug floor wall window door
garden park forest tree trees flower flowers grass field mountain mountains hill river lake sea ocean
beach sand snow rain sky cloud clouds sun moon star stars night day morning evening sunset sunrise
water fire stone rock wood wooden metal glass gold silver paper plastic
red blue green yellow orange purple pink brown black white gray grey colorful
sitting standing walking running lying looking holding wearing playing flying swimming sleeping
next near behind front top bottom left right middle center background foreground inside outside
shirt dress hat jacket coat shoes glasses
food cake bread fruit apple coffee cup plate bowl bottle book books box bag ball
sks
"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair) until every word
    is one symbol. Applying the merges by rank reproduces these segmentations, so each word is one token."""
    b2u = bytes_to_unicode()
    seqs = []
    for word in words:
        chars = [b2u[b] for b in word.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for seq in seqs for p in zip(seq, seq[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


@functools.lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The generated vocabulary (token -> id) and merges (by rank). Deterministic; computed once."""
    merges = _learn_merges(sorted(set(_WORDS.split())))
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, tuple(merges)


def vocab_size() -> int:
    """Number of tokens of the generated tokenizer; the text encoders' vocab_size."""
    return len(vocab_and_merges()[0])


def build_tokenizer(max_length: int = MAX_LENGTH):
    """A transformers CLIPTokenizer over the generated vocabulary; pads/truncates to `max_length` (77)."""
    from transformers import CLIPTokenizer  # lazy: transformers

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


# OpenAI CLIP's BPE merges (the 48,894 that its 49,408-token vocabulary uses; from the MIT-licensed
# bpe_simple_vocab_16e6.txt.gz of openai/CLIP and open_clip), for the tokenizers of single-file SD1.5 / SDXL bases
CLIP_MERGES = Path(__file__).with_name("single_file") / "clip-merges.txt.gz"


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Real CLIP's vocabulary (token -> id, 49,408 tokens) and merges, built as OpenAI CLIP builds them: the
    256 byte symbols, the same with ``</w>``, one token per merge, then start and end of text."""
    lines = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()[1:]
    merges = tuple(tuple(line.split()) for line in lines if line)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS):
    """Real CLIP's tokenizer (SD1.5's and SDXL's first; SDXL's second pads with ``"!"``), offline."""
    from transformers import CLIPTokenizer  # lazy: transformers

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH, pad_token=pad_token)


def load_tokenizer(folder: str | Path):
    """The CLIPTokenizer saved in a local ``folder`` (``save_tokenizer``, or any CLIP tokenizer folder); no hub."""
    from transformers import CLIPTokenizer  # lazy: transformers

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save `tokenizer` to `out_dir` with the classic vocab.json + merges.txt (its own: the generated
    vocabulary, or real CLIP's) beside transformers' own files, so that `CLIPTokenizer.from_pretrained(out_dir)`
    loads it with older transformers versions too."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
