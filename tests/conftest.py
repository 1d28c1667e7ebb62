from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton's interpreter runs the GPU kernels on the CPU; it must be chosen before anything
    # imports triton (peft does, when test modules are collected), not only in test_native.
    os.environ.setdefault("TRITON_INTERPRET", "1")
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


class LiveServers:
    """Servers started for real on localhost port 0 (`runtime.server.create_server`), as users
    run them, each stopped when the fixture's scope ends."""

    def __init__(self) -> None:
        self.running: list = []

    def start(self, config, *, options=None):
        """(server, port, channel) for ``config`` (its port is set to 0); ``options``: the
        insecure channel's grpc options."""
        import dataclasses

        import grpc

        from runtime.server import create_server

        server, port = create_server(dataclasses.replace(config, port=0))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.running.append((server, channel))
        return server, port, channel

    def stop_all(self) -> None:
        for server, channel in reversed(self.running):
            channel.close()
            server.stop(grace=1.0)
        self.running.clear()


@pytest.fixture(scope="module")
def live_servers():
    """The one live-server fixture: ``live_servers.start(config) -> (server, port, channel)``."""
    servers = LiveServers()
    try:
        yield servers
    finally:
        servers.stop_all()
