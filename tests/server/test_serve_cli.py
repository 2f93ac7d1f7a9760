"""`serve` as a process: arguments, binding loopback by default, SIGTERM with a request in flight exits 0."""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from plm_engine.server import cli
from tests.server.conftest import SMOLLM2_GGUF, tiny_llama


def parse(*argv):
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["serve", *argv])


def test_arguments_and_defaults(monkeypatch):
    monkeypatch.delenv("PLM_ENGINE_API_KEY", raising=False)
    a = parse()
    assert (a.model, a.host, a.port, a.api_key) == ("smollm2-135m", "127.0.0.1", 8000, None)
    a = parse(
        "--model",
        "m",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--api-key",
        "k",
        "--max-num-seqs",
        "4",
        "--kv-cache-tokens",
        "4096",
        "--embedding-model",
        "minilm-l6",
    )
    assert (a.host, a.port, a.api_key, a.max_num_seqs, a.kv_cache_tokens, a.embedding_model) == (
        "0.0.0.0",
        0,
        "k",
        4,
        4096,
        "minilm-l6",
    )
    assert a.func is cli.run
    assert cli._is_loopback("127.0.0.1") and cli._is_loopback("::1") and cli._is_loopback("localhost")
    assert not cli._is_loopback("0.0.0.0") and not cli._is_loopback("example.org")


def test_model_options_are_generates(capsys):
    """--model and --dtype come from generation.options, as in `generate`: a bad dtype is a usage error."""
    from plm_engine.generation.options import DTYPES

    assert parse("--dtype", "bfloat16").dtype == "bfloat16" and "bfloat16" in DTYPES
    with pytest.raises(SystemExit) as e:
        parse("--dtype", "float8")
    assert e.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_sigterm_with_a_stream_in_flight_exits_cleanly(tmp_path, smollm2_tokenizer):
    from plm_engine.models import save_pretrained

    folder = save_pretrained(tiny_llama(smollm2_tokenizer.vocab_size), tmp_path / "tiny")
    cmd = [
        sys.executable,
        "-m",
        "plm_engine.cli",
        "serve",
        "--model",
        str(folder),
        "--tokenizer",
        str(SMOLLM2_GGUF),
        "--served-model-name",
        "tiny",
        "--port",
        "0",
        "--max-num-seqs",
        "4",
        "--kv-cache-tokens",
        "2048",
        "--drain-timeout",
        "0.2",
        "--log-level",
        "info",
    ]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    lines: queue.Queue = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        port, deadline = None, time.monotonic() + 120
        while port is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the server did not start:\n" + "".join(log))
            log.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
            if proc.poll() is not None:
                pytest.fail("the server exited at start:\n" + "".join(log))
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").status_code == 200

        events: list[str] = []
        started = threading.Event()

        def client():
            body = {
                "model": "tiny",
                "prompt": "Tell me everything",
                "max_tokens": 240,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        events.append(line)
                        started.set()
            except httpx.HTTPError as e:  # the connection may be cut when the drain time is over
                events.append(f"error: {type(e).__name__}")
            started.set()

        t = threading.Thread(target=client)
        t.start()
        assert started.wait(60), "no streamed event before SIGTERM"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        t.join(timeout=30)
        assert not t.is_alive(), "the client hung after the server stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        log.append(lines.get())
    text = "".join(log)
    assert rc == 0, text
    assert "Application shutdown complete" in text and "Traceback" not in text, text
    # Either drained to the end or cut after the drain timeout; never a half-written event.
    assert events and all(e == "" or e.startswith("data: ") or e.startswith("error:") for e in events), events
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_bad_limits_are_one_line_errors(tmp_path, smollm2_tokenizer, monkeypatch):
    from plm_engine.models import save_pretrained

    monkeypatch.delenv("PLM_ENGINE_API_KEY", raising=False)
    folder = save_pretrained(tiny_llama(smollm2_tokenizer.vocab_size), tmp_path / "tiny")
    base = ["--model", str(folder), "--tokenizer", str(SMOLLM2_GGUF), "--kv-cache-tokens", "512"]
    with pytest.raises(SystemExit, match=r"^serve: max_model_len=100000 is not in \[1, 256\]"):
        cli.run(parse(*base, "--max-model-len", "100000"))
    for flag, value in (("--max-queued-requests", "0"), ("--header-timeout", "0"), ("--limit-concurrency", "-1")):
        with pytest.raises(SystemExit, match=f"^serve: {flag} must be"):
            cli.run(parse(*base, flag, value))
