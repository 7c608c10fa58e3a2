"""The text side and VAE of ``tiny-qwenimage`` (``factory_dit.build_pipeline`` puts them into a
``QwenImagePipeline``): a tiny Qwen2.5-VL, a byte-level BPE tokenizer built here, a tiny Qwen-Image VAE.

The tokenizer is trained on the spot (the ``tokenizers`` package, byte-level BPE, no hub) on the pipeline's
prompt template and a list of caption words, so each of them is one token, as in Qwen2.5's own vocabulary:
the template's system prefix is then 34 tokens, the ``prompt_template_encode_start_idx`` the pipeline drops
(``test_dit_families`` checks it), and the caption's states are what the transformer sees."""

from __future__ import annotations

import functools
import json

from catfast.integrations.factory_parts import seeded

# QwenImagePipeline.prompt_template_encode (diffusers 0.42)
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# Qwen2.5-VL's: pad / end of text, chat turns, and the vision placeholders (ids the text encoder's config names)
SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
WORDS = """a an the of and in on at with photo picture image painting drawing style portrait sks cat dog man woman
person toy statue car house tree flower star ball box moon sky beach forest city street room red blue green yellow
black white grey orange purple pink brown small large background plain sitting standing"""


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # lazy: tokenizers

    text = TEMPLATE
    for token in SPECIAL:
        text = text.replace(token, "")
    words = WORDS.split()
    corpus = [text.format(" ".join(words))] + words  # each word with and without its leading space
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in SPECIAL:
        vocab[token] = len(vocab)
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"])
    return vocab, merges


def qwen_tokenizer():
    """A transformers ``Qwen2Tokenizer`` (byte-level BPE; ``<|endoftext|>`` pads, ``<|im_start|>`` /
    ``<|im_end|>`` special) over the vocabulary trained here (about 400 tokens)."""
    from transformers import Qwen2Tokenizer  # lazy: transformers

    vocab, merges = _vocab_and_merges()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL[1:])})
    return tokenizer


def qwen_text_encoder(seed: int, tokenizer):
    """A ``Qwen2_5_VLForConditionalGeneration`` 32 wide (2 layers, 2 heads of 16, multimodal rotary sections
    2 + 3 + 3) with a 1-layer vision tower; the pipeline reads the last hidden states."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # lazy: transformers

    vocab_size, ids = len(tokenizer), tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config)).eval()


def qwen_vae(seed: int):
    """An ``AutoencoderKLQwenImage`` with Qwen-Image's 16 latent channels and latent statistics, 2x spatial
    (base width 16, one down level, no temporal downsampling)."""
    from diffusers import AutoencoderKLQwenImage  # lazy: diffusers

    return seeded(
        seed,
        lambda: AutoencoderKLQwenImage(
            base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]
        ),
    ).eval()


def qwen_components(seed: int) -> dict:
    """text_encoder (``seed + 1``), tokenizer and vae (``seed + 9``) of ``tiny-qwenimage``."""
    tokenizer = qwen_tokenizer()
    return dict(text_encoder=qwen_text_encoder(seed + 1, tokenizer), tokenizer=tokenizer, vae=qwen_vae(seed + 9))
