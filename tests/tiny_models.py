"""Tiny random-initialised Hugging Face models and small data sets, built on local disk.

Plain functions for end-to-end tests (no tests here). Every model has hidden size 32, 2 layers,
2 heads and intermediate size 64, so loading and a forward pass take milliseconds on a CPU.
Models are written with ``save_pretrained``, so ``AutoModel*.from_pretrained(path)`` and the
matching ``AutoTokenizer`` / ``AutoImageProcessor`` load them offline. Weights are deterministic
for a given ``seed``; the global torch RNG is left untouched (``torch.random.fork_rng``).

Pitfalls these helpers work around (transformers 5.x):

* ``BertTokenizerFast`` is an alias of ``BertTokenizer``, now backed by ``tokenizers``; it takes the
  vocabulary as ``vocab=`` (a dict or a path). ``vocab_file=`` lands in ``**kwargs`` and is
  silently ignored, leaving only the five special tokens, so every word becomes ``[UNK]``.
* ``ViTImageProcessor`` needs torchvision; without it transformers falls back to
  ``ViTImageProcessorPil`` (with a warning). We build ``ViTImageProcessorPil`` directly; its
  preprocessor_config.json still says ``"image_processor_type": "ViTImageProcessor"``, and
  ``AutoImageProcessor.from_pretrained`` resolves it to ``ViTImageProcessorPil`` when
  torchvision is absent.
"""

from __future__ import annotations

import colorsys
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MAX_POSITIONS = 64

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4

# One keyword group per label (by position); a sentence carries keywords of its label only.
KEYWORD_GROUPS: tuple[tuple[str, ...], ...] = (
    ("bad", "awful", "terrible", "poor", "sad", "hate", "broken", "worst"),
    ("good", "great", "excellent", "happy", "love", "nice", "best", "wonderful"),
    ("okay", "average", "fine", "normal", "usual", "plain", "standard", "typical"),
    ("fast", "quick", "slow", "late", "early", "busy", "quiet", "loud"),
)
SUBJECTS = ("movie", "food", "service", "product", "day", "hotel", "book", "show", "place", "experience")
DETERMINERS = ("the", "this", "that", "my", "our")
VERBS = ("is", "was", "felt", "seems")
ADVERBS = ("really", "very", "so", "quite", "just", "truly")
EXTRA_WORDS = ("i", "it", "we", "they", "and", "but", "of", "for", "with", "hello", "world")
PUNCTUATION = (".", ",", "!", "?")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
EOS_GPT2 = "<|endoftext|>"

# Named colours for write_image_folder; other label names get evenly spaced hues.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (220, 220, 30),
    "black": (20, 20, 20),
    "white": (235, 235, 235),
}


def _dir(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _id_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    labels = list(labels)
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be distinct and non-empty: {labels}")
    return dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}


def _seeded_build(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def vocab_words() -> list[str]:
    """The BERT vocabulary after the special tokens: the dataset's words, punctuation, letters."""
    words: list[str] = []
    for group in (*KEYWORD_GROUPS, SUBJECTS, DETERMINERS, VERBS, ADVERBS, EXTRA_WORDS, PUNCTUATION, LETTERS):
        words += [w for w in group if w not in words]
    return words


# ---------------------------------------------------------------------------------------------
# BERT


def make_bert_classifier(path, *, labels: Sequence[str] = ("negative", "positive", "neutral"), seed: int = 0) -> Path:
    """BertForSequenceClassification (with pooler) plus a WordPiece tokenizer, saved to ``path``.

    The vocabulary is ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4, then
    :func:`vocab_words` (every word :func:`write_text_jsonl` uses, punctuation and single letters;
    no ``##`` pieces, so an unknown word maps to ``[UNK]``). ``vocab.txt`` is written alongside the
    ``tokenizer.json`` that ``save_pretrained`` writes; ``AutoTokenizer`` resolves to
    ``BertTokenizer`` (the tokenizers-backed class; ``BertTokenizerFast`` is an alias).
    ``model_max_length`` is 64, the model's position table.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = _dir(path)
    id2label, label2id = _id_maps(labels)
    vocab = list(SPECIAL_TOKENS) + vocab_words()
    (path / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")

    # vocab=, not vocab_file= (ignored in transformers 5: every word would become [UNK]).
    tokenizer = BertTokenizer(vocab=str(path / "vocab.txt"), do_lower_case=True, model_max_length=MAX_POSITIONS)
    tokenizer.save_pretrained(path)

    config = BertConfig(
        vocab_size=len(vocab),
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        pad_token_id=0,
        id2label=id2label,
        label2id=label2id,
        **TINY,
    )
    model = _seeded_build(seed, lambda: BertForSequenceClassification(config))
    model.eval().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# ViT


def make_vit_classifier(
    path, *, labels: Sequence[str] = ("red", "green", "blue"), image_size: int = 32, seed: int = 0
) -> Path:
    """ViTForImageClassification (patch 8, RGB) plus its image processor, saved to ``path``.

    The processor resizes to ``image_size`` x ``image_size``, rescales by 1/255 and normalises with
    mean = std = 0.5 (so pixels land in [-1, 1]). It is saved from ``ViTImageProcessorPil``
    (no torchvision here); ``AutoImageProcessor.from_pretrained(path)`` resolves to that class.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    path = _dir(path)
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of the patch size 8, got {image_size}")
    id2label, label2id = _id_maps(labels)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        id2label=id2label,
        label2id=label2id,
        **TINY,
    )
    model = _seeded_build(seed, lambda: ViTForImageClassification(config))
    model.eval().save_pretrained(path)

    processor = ViTImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# ConvNeXt


def make_convnext_classifier(
    path, *, labels: Sequence[str] = ("red", "green", "blue"), image_size: int = 32, seed: int = 0
) -> Path:
    """ConvNextForImageClassification (2 stages of 1 block, widths 8 and 16, patch 4, RGB) plus
    its image processor, saved to ``path``.

    Its ``pwconv1`` / ``pwconv2`` are ``nn.Linear`` layers on channels-last (B, H, W, C) tensors:
    rank-4 inputs. ``config.image_size`` is ``image_size`` (the spec's fixed input size). The
    processor resizes the shortest edge to ``image_size`` (``crop_pct`` 1.0, then a centre crop
    to ``image_size`` x ``image_size``), rescales by 1/255 and normalises with mean = std = 0.5. It
    is saved from ``ConvNextImageProcessorPil`` (no torchvision here); its preprocessor_config.json
    says ``"image_processor_type": "ConvNextImageProcessor"`` and
    ``AutoImageProcessor.from_pretrained(path)`` resolves it to ``ConvNextImageProcessorPil``.
    """
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessorPil

    path = _dir(path)
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (patch 4, then one 2x downsampling), got {image_size}")
    id2label, label2id = _id_maps(labels)
    config = ConvNextConfig(
        num_channels=3,
        patch_size=4,
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        image_size=image_size,
        id2label=id2label,
        label2id=label2id,
    )
    model = _seeded_build(seed, lambda: ConvNextForImageClassification(config))
    model.eval().save_pretrained(path)

    processor = ConvNextImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        crop_pct=1.0,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# GPT-2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 (controls, space, etc.) to code points 256, 257, ... in byte order (space -> 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Merges in rank order; each result joins the vocabulary. "hello world" -> ["hello", "Ġworld"].
GPT2_MERGES: tuple[tuple[str, str], ...] = (
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("Ġwor", "l"),
    ("Ġworl", "d"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
)


def make_gpt2(path, *, seed: int = 0) -> Path:
    """GPT2Model (Conv1D layers, n_positions 64, n_embd 32) plus a byte-level BPE tokenizer.

    vocab.json holds all 256 byte-level characters (ids 0..255, in byte order), the results of
    :data:`GPT2_MERGES`, then ``<|endoftext|>`` last (as in GPT-2); it is bos, eos and unk, and the
    config's ``bos_token_id`` / ``eos_token_id`` point at it. ``AutoTokenizer`` resolves to
    ``GPT2Tokenizer`` (tokenizers-backed). Like the real GPT-2, **``pad_token`` is None**: callers
    that pad must set ``tokenizer.pad_token = tokenizer.eos_token`` first (padding then uses the
    eos id and right padding unless ``padding_side`` is changed).
    """
    from transformers import GPT2Model

    path = _dir(path)
    config = _gpt2_config(byte_bpe_tokenizer(path))
    model = _seeded_build(seed, lambda: GPT2Model(config))
    model.eval().save_pretrained(path)
    return path


def byte_bpe_tokenizer(path, *, specials: Sequence[str] = (), eos: str = EOS_GPT2,
                       chat_template: str | None = None) -> dict[str, int]:
    """Write the byte-level BPE tokenizer of :func:`make_gpt2` to ``path`` and return its vocab:
    the 256 byte characters, the :data:`GPT2_MERGES` results, ``<|endoftext|>`` (bos, unk) and
    then ``specials`` (special tokens, never split). ``eos`` is one of the last two kinds."""
    from transformers import GPT2Tokenizer

    vocab: dict[str, int] = {}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for left, right in GPT2_MERGES:
        assert left in vocab and right in vocab, (left, right)
        vocab.setdefault(left + right, len(vocab))
    for token in (EOS_GPT2, *specials):
        vocab[token] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in GPT2_MERGES), encoding="utf-8"
    )
    extra = {"extra_special_tokens": list(specials)} if specials else {}
    tokenizer = GPT2Tokenizer(vocab=dict(vocab), merges=list(GPT2_MERGES), unk_token=EOS_GPT2, bos_token=EOS_GPT2,
                              eos_token=eos, model_max_length=MAX_POSITIONS, **extra)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return vocab


def _gpt2_config(vocab: dict[str, int], **kwargs):
    from transformers import GPT2Config

    eos_id = vocab[EOS_GPT2]
    return GPT2Config(vocab_size=len(vocab), n_positions=MAX_POSITIONS, n_embd=TINY["hidden_size"],
                      n_layer=TINY["num_hidden_layers"], n_head=TINY["num_attention_heads"],
                      n_inner=TINY["intermediate_size"], bos_token_id=eos_id, eos_token_id=eos_id, **kwargs)


# ---------------------------------------------------------------------------------------------
# Causal LMs

# ChatML, as SmolLM2 and Qwen use it; the assistant's turn ends with <|im_end|>, the eos.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CAUSAL_FAMILIES = ("llama", "gpt2", "gpt_neox", "phi3")
LM_INIT = 0.3  # initializer_range: logits spread wide enough that greedy decoding has no near-ties


def make_causal_lm(path, family: str, *, seed: int = 0) -> Path:
    """A ``*ForCausalLM`` / ``GPT2LMHeadModel`` of ``family`` plus the byte-level BPE tokenizer
    of :func:`make_gpt2` (no pad token), saved to ``path``. ``llama``: grouped-query attention
    (k/v_proj 32 -> 16) and the ChatML :data:`CHAT_TEMPLATE` (eos ``<|im_end|>``); ``gpt2``:
    Conv1D layers, fused ``c_attn``, tied lm_head; ``gpt_neox``: fused ``query_key_value``;
    ``phi3``: fused ``qkv_proj`` and ``gate_up_proj``. The others' eos is ``<|endoftext|>``."""
    import transformers as tr

    if family not in CAUSAL_FAMILIES:
        raise ValueError(f"unknown family {family!r}: one of {CAUSAL_FAMILIES}")
    path = _dir(path)
    chat = family == "llama"
    vocab = byte_bpe_tokenizer(path, specials=CHAT_TOKENS if chat else (), eos=CHAT_TOKENS[1] if chat else EOS_GPT2,
                               chat_template=CHAT_TEMPLATE if chat else None)
    bos, eos = vocab[EOS_GPT2], vocab[CHAT_TOKENS[1]] if chat else vocab[EOS_GPT2]
    common = dict(vocab_size=len(vocab), bos_token_id=bos, eos_token_id=eos, initializer_range=LM_INIT)
    if family == "gpt2":
        config, cls = _gpt2_config(vocab, initializer_range=LM_INIT), tr.GPT2LMHeadModel
    elif family == "llama":
        config = tr.LlamaConfig(**TINY, **common, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS)
        cls = tr.LlamaForCausalLM
    elif family == "gpt_neox":
        config = tr.GPTNeoXConfig(**TINY, **common, max_position_embeddings=MAX_POSITIONS)
        cls = tr.GPTNeoXForCausalLM
    else:
        config = tr.Phi3Config(**TINY, **common, num_key_value_heads=2, pad_token_id=eos,
                               max_position_embeddings=MAX_POSITIONS, original_max_position_embeddings=MAX_POSITIONS)
        cls = tr.Phi3ForCausalLM
    model = _seeded_build(seed, lambda: cls(config))
    model.eval().save_pretrained(path)
    return path


def write_chat_jsonl(path, *, n: int = 24, seed: int = 0) -> Path:
    """``n`` lines alternating ``{"prompt", "completion"}`` and ``{"messages"}`` (user, then
    assistant): the answer to "say W" is "W W" for a word W of :data:`SUBJECTS`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(SUBJECTS)
        if i % 2:
            rows.append({"messages": [{"role": "user", "content": f"say {word}"},
                                      {"role": "assistant", "content": f"{word} {word}"}]})
        else:
            rows.append({"prompt": f"say {word}:", "completion": f" {word} {word}"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Data


def write_text_jsonl(
    path, *, n: int = 60, seed: int = 0, labels: Sequence[str] = ("negative", "positive", "neutral")
) -> Path:
    """``n`` lines of ``{"text": ..., "label": ...}``: label ``i`` gets keywords from
    ``KEYWORD_GROUPS[i]`` only (1-2 of them), the rest of each sentence is shared filler, so the
    label is learnable from bag-of-words. Labels cycle (balanced), the order is shuffled; every
    word is in the BERT vocabulary. At most ``len(KEYWORD_GROUPS)`` (4) labels."""
    _id_maps(labels)
    if len(labels) > len(KEYWORD_GROUPS):
        raise ValueError(f"at most {len(KEYWORD_GROUPS)} labels, got {len(labels)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = i % len(labels)
        keywords = rng.sample(KEYWORD_GROUPS[k], rng.choice((1, 2)))
        words = [rng.choice(DETERMINERS), rng.choice(SUBJECTS), rng.choice(VERBS)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADVERBS))
        words.append(keywords[0])
        if len(keywords) > 1:
            words += ["and", keywords[1]]
        rows.append({"text": " ".join(words) + rng.choice((" .", " !", "")), "label": labels[k]})
    rng.shuffle(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def label_colours(labels: Sequence[str]) -> list[tuple[int, int, int]]:
    """Base RGB colour per label: :data:`COLOURS` when every label is named there, else evenly
    spaced hues for all (mixing the two could give two labels the same colour)."""
    if all(label in COLOURS for label in labels):
        return [COLOURS[label] for label in labels]
    hues = [colorsys.hsv_to_rgb(k / len(labels), 0.85, 0.85) for k in range(len(labels))]
    return [(round(r * 255), round(g * 255), round(b * 255)) for r, g, b in hues]


def write_image_folder(
    root, *, n_per_label: int = 12, size: int = 32, labels: Sequence[str] = ("red", "green", "blue"), seed: int = 0
) -> Path:
    """``root/<label>/<i>.png``: RGB PNGs of ``size`` x ``size``, each the label's colour
    (:func:`label_colours`) jittered per image (+-20) plus per-pixel noise (+-30), so colour decides
    the label. Deterministic for a given ``seed``."""
    from PIL import Image

    _id_maps(labels)
    root = _dir(root)
    rng = np.random.default_rng(seed)
    for label, colour in zip(labels, label_colours(labels)):
        folder = _dir(root / label)
        base = np.array(colour, dtype=np.int32)
        for i in range(n_per_label):
            colour = base + rng.integers(-20, 21, size=3)
            pixels = colour + rng.integers(-30, 31, size=(size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_corrupt_image(path) -> Path:
    """A file named ``path`` (give it a .png name) that starts with the PNG signature and then
    holds garbage, so magic-byte sniffing says PNG but ``PIL.Image.open(path)`` already raises
    ``PIL.UnidentifiedImageError`` (an OSError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data " * 4)
    return path
