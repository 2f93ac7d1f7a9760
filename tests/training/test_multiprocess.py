"""Runs in subprocesses: `plm-engine train` under torchrun with 2 gloo processes (DDP and FSDP2) equals one
process with the same global batch; SIGTERM mid-run writes a valid checkpoint and exits 128 + 15."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from plm_engine.training import checkpoint as ckpt
from tests.training.helpers import losses, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_config(path, data, out_dir, **kw) -> str:
    cfg = dict(
        objective="clm",
        model="gpt2-tiny",
        data=data,
        tokenizer="bpe",
        bpe_vocab_size=320,
        seq_len=32,
        batch_size=4,
        max_steps=6,
        lr=3e-3,
        warmup_steps=2,
        eval_every=3,
        eval_batches=2,
        out_dir=out_dir,
        cache_dir=str(path) + "_cache",
        progress=False,
        plot=False,
    )
    cfg.update(kw)
    lines = ["[train]"] + [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("PLM_ENGINE_BACKEND", None)
    return e


def cli(*args, timeout=180, nproc=0):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    cmd = launcher + ["-m", "plm_engine.training.cli", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, corpus):
    """The one-process reference run (batch 4), shared by the DDP and FSDP comparisons."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = write_config(tmp / "c.toml", corpus, str(tmp / "one"), max_steps=4, eval_every=2)
    one = cli(cfg)
    assert one.returncode == 0, one.stderr[-3000:]
    return cfg, tmp / "one"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single_run, mode):
    cfg, one_dir = single_run
    two = cli(cfg, "--batch-size", "2", "--distributed", mode, "--out-dir", str(tmp_path / "two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(str(one_dir / "log.jsonl")), losses(str(tmp_path / "two" / "log.jsonl"))
    assert sorted(l1) == sorted(l2) == list(range(1, 5))
    for s in l1:  # same samples per step; only the gradient all-reduce's summation order differs
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), (s, l1[s], l2[s])
    e1, e2 = losses(str(one_dir / "log.jsonl"), "eval"), losses(str(tmp_path / "two" / "log.jsonl"), "eval")
    assert e1.keys() == e2.keys() and all(e2[s] == pytest.approx(e1[s], rel=1e-4) for s in e1)
    ck = ckpt.latest_checkpoint(str(tmp_path / "two" / "checkpoints"))
    assert ckpt.verify_checkpoint(ck)["step"] == 4


def test_seq2seq_ddp_matches_one_process(tmp_path, corpus):
    """The seq2seq (denoising) objective under DDP: the same loss curve as one process."""
    kw = dict(objective="seq2seq", model="bart-tiny", max_steps=3, eval_every=0, show_reconstructions=1)
    cfg = write_config(tmp_path / "c.toml", corpus, str(tmp_path / "one"), **kw)
    one = cli(cfg)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(cfg, "--batch-size", "2", "--distributed", "ddp", "--out-dir", str(tmp_path / "two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(str(tmp_path / "one" / "log.jsonl")), losses(str(tmp_path / "two" / "log.jsonl"))
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    assert all(l2[s] == pytest.approx(l1[s], rel=1e-4) for s in l1), (l1, l2)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert len(summary["reconstructions"]) == 1


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, corpus):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", corpus, str(out), max_steps=100000, eval_every=0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "plm_engine.training.cli", "train", cfg],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out / "log.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        assert log.exists(), "training did not start within 120 s"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    path = ckpt.latest_checkpoint(str(out / "checkpoints"))
    step = ckpt.verify_checkpoint(path)["step"]
    assert 3 <= step < 100000
    assert max(losses(str(log))) == step  # the checkpoint is the last step trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == signal.SIGTERM and summary["checkpoint"] == path
