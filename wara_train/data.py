"""Offline data sets for the built-in tasks (DESIGN.md section 5) and a seeded stratified split.

Every loader returns ``(examples, labels, label_names)``; nothing is downloaded.
"""

from __future__ import annotations

import os
import random
import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

from .errors import ConfigError

# Latin-script languages, so the task is not solved by the script alone.
LANGID_LANGUAGES: tuple[str, ...] = (
    "english", "spanish", "portuguese", "italian", "french", "german", "dutch", "indonesian", "turkish", "swedish",
)


def _corpus_dir() -> str:
    try:
        import chatterbot_corpus
    except ImportError as e:
        raise ConfigError(f"the chatterbot tasks need the 'models' extra: pip install 'wara-serve[models]' ({e})") from None
    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")


def _utterances(language: str) -> dict[str, list[str]]:
    """Unique utterances of one corpus language, grouped by topic file (sorted, deterministic)."""
    import yaml

    folder = os.path.join(_corpus_dir(), language)
    if not os.path.isdir(folder):
        raise ConfigError(f"chatterbot-corpus has no language {language!r}")
    out: dict[str, list[str]] = {}
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".yml"):
            continue
        with open(os.path.join(folder, fname), encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        seen: dict[str, None] = {}
        for conv in doc.get("conversations") or []:
            for s in conv if isinstance(conv, list) else [conv]:
                if isinstance(s, str) and s.strip():
                    seen.setdefault(" ".join(s.split()), None)
        out[fname[: -len(".yml")]] = list(seen)
    return out


def chatterbot_topics() -> tuple[list[str], list[int], list[str]]:
    """English utterances labelled by topic file; texts that occur under two topics are dropped."""
    by_topic = _utterances("english")
    owner: dict[str, set[str]] = defaultdict(set)
    for topic, texts in by_topic.items():
        for t in texts:
            owner[t].add(topic)
    names = sorted(by_topic)
    texts, labels = [], []
    for i, topic in enumerate(names):
        for t in by_topic[topic]:
            if len(owner[t]) == 1:
                texts.append(t)
                labels.append(i)
    return texts, labels, names


def chatterbot_langid(
    languages: Sequence[str] = LANGID_LANGUAGES, *, per_language: int = 200, seed: int = 0
) -> tuple[list[str], list[int], list[str]]:
    """Utterances labelled by language, at most ``per_language`` each (a seeded sample)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i, lang in enumerate(languages):
        pool = sorted({t for ts in _utterances(lang).values() for t in ts})
        rng.shuffle(pool)
        for t in pool[:per_language]:
            texts.append(t)
            labels.append(i)
    return texts, labels, list(languages)


def digits() -> tuple[list[Any], list[int], list[str]]:
    """scikit-learn's 8x8 digits (1,797 images, values 0..16), shipped with the package."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ConfigError(f"the digits task needs the 'models' extra: pip install 'wara-serve[models]' ({e})") from None
    d = load_digits()
    return list(d.images), [int(y) for y in d.target], [str(i) for i in range(10)]


def stratified_split(labels: Sequence[int], *, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test): each class keeps about ``test_fraction`` in test (at least one when
    it has two or more examples). Deterministic for a seed."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    train, test = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


# ------------------------------------------------------------------------------------------
# the user's own data (wara train --data)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_jsonl(path: str | os.PathLike, *, labels: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """A JSONL file of ``{"text": ..., "label": ...}`` lines -> ``(texts, label ids, label names)``.

    Label names are sorted (numerically when all are integers: `sort_labels`) unless ``labels``
    fixes their order (a held-out file must use the training file's labels). Every bad line is
    reported by number."""
    import json

    texts, raw = [], []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data {path}: cannot read it ({e})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise ConfigError(f'{path}:{i}: expected {{"text": "...", "label": ...}}')
        if not isinstance(row["label"], (str, int)) or isinstance(row["label"], bool):
            raise ConfigError(f"{path}:{i}: label must be a string or an integer, got {row['label']!r}")
        texts.append(row["text"])
        raw.append(str(row["label"]))
    return _index_labels(str(path), texts, raw, labels)


def load_image_folder(root: str | os.PathLike, *, labels: Sequence[str] | None = None) -> tuple[list[Any], list[int], list[str]]:
    """``ROOT/<label>/<file>.png|jpg`` -> ``(PIL images, label ids, label names)``. An image that
    does not decode is refused by name."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise ConfigError(f"image folders need Pillow: pip install 'wara-serve[models]' ({e})") from None
    if not os.path.isdir(root):
        raise ConfigError(f"--data {root}: not a directory (an image folder is ROOT/<label>/<file>.png)")
    images, raw = [], []
    for label in sorted(os.listdir(root)):
        folder = os.path.join(root, label)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(os.listdir(folder)):
            if not fname.lower().endswith(IMAGE_SUFFIXES):
                continue
            f = os.path.join(folder, fname)
            try:
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise ConfigError(f"{f}: not a decodable image ({e})") from None
            raw.append(label)
    return _index_labels(str(root), images, raw, labels)


_INTEGER = re.compile(r"[+-]?\d+")


def sort_labels(names: Iterable[str]) -> list[str]:
    """Label names in their canonical order: numerically when every one is an integer
    ("2" before "10"), else as strings."""
    names = list(names)
    if names and all(_INTEGER.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _index_labels(source: str, examples: list, raw: list[str], labels: Sequence[str] | None):
    if not examples:
        raise ConfigError(f"{source}: no examples found")
    names = list(labels) if labels is not None else sort_labels(set(raw))
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{source}: labels {unknown[:5]} are not among the training labels {names[:10]}")
    if labels is None and len(names) < 2:
        raise ConfigError(f"{source}: needs at least two labels to train a classifier, found {names}")
    index = {n: i for i, n in enumerate(names)}
    return examples, [index[r] for r in raw], names
