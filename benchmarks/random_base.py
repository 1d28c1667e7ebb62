"""A random-initialised BERT written to disk as a transformers model directory, so a benchmark
runs where no model package is installed (``make gpu-check``): ``hf:DIR`` of it is a base like
any other (`wara_train.basespec.resolve_base`).

Shapes (`SHAPES`): ``minilm`` is all-MiniLM-L6-v2's encoder (6 layers, width 384, 12 heads, FFN
1536, 512 positions), so its timings compare with the MiniLM workload's; ``tiny`` (2 layers,
width 32) is for checks that only need the code to run. Weights are seeded random, which
latency and throughput do not notice. The vocabulary is small (an embedding lookup costs the
same at any vocabulary size) and the WordPiece tokenizer files are written too, so the
directory is a complete model that ``AutoTokenizer`` and ``AutoModel`` load offline.

    .venv/bin/python -m benchmarks.random_base DIR [--shape minilm|tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES: dict[str, dict[str, int]] = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   max_position_embeddings=512),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64),
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as in BERT's vocab order here


def write_random_bert(path, *, shape: str = "minilm", vocab_size: int = 1024, seed: int = 0) -> Path:
    """A ``BertModel`` (no pooler: a mean-pooled feature extractor, as MiniLM is served) of
    ``SHAPES[shape]`` with seeded random weights, saved with ``save_pretrained`` to ``path``,
    plus ``vocab.txt`` (the special tokens, then ``w5``, ``w6``, ...) and its tokenizer config.
    The global torch RNG is left as it was."""
    import torch
    from transformers import BertConfig, BertModel

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: valid shapes are {', '.join(SHAPES)}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS) + [f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size)]
    (path / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
    sizes = SHAPES[shape]
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": sizes["max_position_embeddings"],
         "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
         "mask_token": "[MASK]"}, indent=2) + "\n")
    config = BertConfig(vocab_size=vocab_size, type_vocab_size=2, pad_token_id=0, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.eval().save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory to write the model to")
    p.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_random_bert(args.out, shape=args.shape, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
