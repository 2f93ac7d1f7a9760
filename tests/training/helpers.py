"""A small synthetic corpus and tiny-run configs shared by the training tests (no downloads, seconds)."""

from __future__ import annotations

import json
import os
import random

import torch

WORDS = (
    "the king queen lord lady love death night day sword crown war peace fool heart blood "
    "sweet good noble fair foul speak hear come go stay fly my thy your our what why how when"
).split()


def write_corpus(folder: str, n_files: int = 3, lines: int = 300, seed: int = 0) -> list[str]:
    """Text files of pseudo-sentences with enough regularity for a tiny model to learn a little."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n_files):
        rows = []
        for _ in range(lines):
            n = rng.randint(4, 10)
            start = rng.randrange(len(WORDS))
            # words mostly follow a fixed successor chain, sometimes jump: learnable bigram structure
            ws = [WORDS[(start + k * 3 + (rng.random() < 0.2)) % len(WORDS)] for k in range(n)]
            rows.append(" ".join(ws).capitalize() + rng.choice([".", "!", "?"]))
        p = os.path.join(folder, f"part{i}.txt")
        with open(p, "w") as f:
            f.write("\n".join(rows) + "\n")
        paths.append(p)
    return paths


def tiny_settings(out_dir, data, **kw) -> dict:
    """The [train] settings of a 10-step BPE run of gpt2-tiny on data, writing to out_dir (kw overrides)."""
    base = dict(
        objective="clm",
        model="gpt2-tiny",
        data=data,
        tokenizer="bpe",
        bpe_vocab_size=320,
        seq_len=32,
        batch_size=4,
        max_steps=10,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        eval_batches=2,
        out_dir=str(out_dir),
        cache_dir=str(out_dir) + "_cache",
        progress=False,
        plot=False,
        seed=0,
    )
    return {**base, **kw}


def tiny_config(tmp, data, **kw):
    from plm_engine.training.config import TrainConfig

    return TrainConfig(**tiny_settings(tmp, data, **kw))


def losses(log_path: str, split: str = "train") -> dict[int, float]:
    from plm_engine.training.metrics import read_log

    return {r["step"]: r["loss"] for r in read_log(log_path) if r["split"] == split}


def keyword_rows(path, n: int = 120, signal: float = 0.6) -> str:
    """A JSONL file of three keyword classes: each word is its class's keyword with probability `signal`."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        label = i % 3
        words = [["sun", "joy", "wed"], ["king", "war", "crown"], ["death", "grave", "blood"]][label]
        noise = ["and", "the", "of", "a", "then"]
        seq = [words[j] if torch.rand(1, generator=g).item() < signal else noise[j] for j in range(3) for _ in range(2)]
        rows.append({"text": " ".join(seq), "label": ["comedy", "history", "tragedy"][label]})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


# The classification runs' shared settings: bert-tiny on keyword_rows' JSONL, small batches.
CLASSIFY = dict(objective="classify", model="bert-tiny", dataset="jsonl", batch_size=8, seq_len=16, lr=3e-3)
