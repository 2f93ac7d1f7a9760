"""Issue 16 point 7, shortened: benchmarks/soak_serve.py for 5 + 10 s against a served tiny model: 64 streaming
clients and a trickle of malformed requests; no 5xx, every stream ends with [DONE], no KV block leaked,
resident memory growth < 5%. (The 60 s run against smollm2-135m is the script's default.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import SMOLLM2_GGUF, tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_soak_10s(tmp_path, smollm2_tokenizer):
    pytest.importorskip("psutil")
    from plm_engine.models import save_pretrained

    folder = save_pretrained(tiny_llama(smollm2_tokenizer.vocab_size), tmp_path / "tiny")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "soak_serve.py"),
        "--model", str(folder), "--tokenizer", str(SMOLLM2_GGUF),
        "--warmup", "5", "--duration", "10", "--clients", "64", "--malformed-per-s", "10", "--max-tokens", "16",
        "--kv-cache-tokens", "4096", "--json", "--no-csv",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    full = json.loads(proc.stdout)
    env = ("timestamp", "commit", "device", "device_name", "torch", "triton", "threads", "env")
    row = {k: v for k, v in full.items() if k not in env}  # what the assertion messages show
    print(row)
    assert row["responses_5xx"] == 0 and row["stream_error_events"] == 0 and row["transport_errors"] == 0, row
    assert row["streams_done"] >= 64 and row["streams_without_done"] == 0, row
    assert row["streams_abandoned"] >= 5 and row["malformed_not_4xx"] == 0, row
    assert row["kv_blocks_used_after"] == 0 and row["running_after"] == 0 and row["waiting_after"] == 0, row
    assert row["rss_growth"] < 0.05, row
    assert row["passed"] and proc.returncode == 0, proc.stderr[-3000:]
