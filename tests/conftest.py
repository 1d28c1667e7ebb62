from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message="Sparse")  # ptwt's sparse boundary matrices


@pytest.fixture(scope="session")
def minilm_factory():
    """Builds fresh MiniLM classifiers; the weights are read from the package each time."""
    from wara_train.bases import build_minilm

    return build_minilm


@pytest.fixture(scope="session")
def minilm_batch():
    from wara_train.bases import MiniLMTokenizer

    tok = MiniLMTokenizer(max_length=24)
    return tok(["what is artificial intelligence?", "do you like football", "tell me a joke about computers"])
