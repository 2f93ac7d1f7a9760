"""Data pipeline: BPE training, the memmap token cache, block packing, MLM masking statistics, the
resumable sampler and its sharding, configs and schedules, the Shakespeare corpus."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from plm_engine.training import data as D
from plm_engine.training import schedule
from plm_engine.training.config import TrainConfig, parse_override
from tests.training.helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    files = write_corpus(str(folder))
    return str(folder), files, D.train_bpe(files, 320, "causal")


def test_bpe_roundtrip_and_specials(corpus, tmp_path):
    _, files, tok = corpus
    text = "The king speaks, the queen hears: ünïcödé too!"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown
    assert tok.vocab_size <= 320 and tok.eos_token_id is not None
    tok.save(str(tmp_path))
    again = D.TextTokenizer.from_folder(str(tmp_path))
    assert again.encode(text) == tok.encode(text) and again.eos_token_id == tok.eos_token_id
    bert = D.train_bpe(files, 320, "bert")
    assert None not in (bert.cls_token_id, bert.sep_token_id, bert.mask_token_id, bert.pad_token_id)


def test_token_cache_is_reused_and_invalidated(corpus, tmp_path):
    folder, files, tok = corpus
    first = D.tokenize_corpus(files, tok, str(tmp_path), separator=tok.eos_token_id)
    assert not first.from_cache and isinstance(first.tokens, np.memmap)
    expect = []
    for f in files:
        expect += tok.encode(D.read_text(f)) + [tok.eos_token_id]
    assert first.tokens.tolist() == expect
    assert first.doc_offsets[-1] == len(expect) and len(first.doc_offsets) == len(files) + 1
    second = D.tokenize_corpus(files, tok, str(tmp_path), separator=tok.eos_token_id)
    assert second.from_cache and second.path == first.path
    assert np.array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
    # a changed file is a new cache entry
    with open(files[0], "a") as f:
        f.write("More words.\n")
    third = D.tokenize_corpus(files, tok, str(tmp_path), separator=tok.eos_token_id)
    assert not third.from_cache and len(third) > len(first)
    # a truncated cache file is rebuilt, not read
    with open(third.path, "r+b") as f:
        f.truncate(10)
    fourth = D.tokenize_corpus(files, tok, str(tmp_path), separator=tok.eos_token_id)
    assert not fourth.from_cache and len(fourth) == len(third)


def test_list_text_files(corpus, tmp_path):
    folder, files, _ = corpus
    assert D.list_text_files([folder]) == sorted(files)
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        D.list_text_files([str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="no .txt"):
        D.list_text_files([str(tmp_path)])


def test_packed_blocks():
    tokens = np.arange(103, dtype=np.uint16)
    blocks = D.PackedBlocks(tokens, 10, 0, 95)
    assert len(blocks) == 9 and blocks[3].tolist() == list(range(30, 40)) and blocks[3].dtype == torch.int64
    wrapped = D.PackedBlocks(tokens, 8, 40, cls=1000, sep=1001)
    assert wrapped[0].tolist() == [1000] + list(range(40, 48)) + [1001]
    with pytest.raises(IndexError):
        blocks[9]
    with pytest.raises(ValueError, match="do not fill one block"):
        D.PackedBlocks(tokens, 200)


def test_mlm_masking_statistics():
    vocab, mask_id, specials = 1000, 3, {0, 1, 2, 3}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (200_000,), generator=g)
    ids[::50] = 1  # special tokens are never chosen
    inp, labels = D.mask_tokens(ids, mask_id, vocab, specials, D.sample_generator(0, 0, 0))
    chosen = labels != -100
    assert not chosen[::50].any()
    assert (labels[chosen] == ids[chosen]).all()
    rate = chosen.float().mean().item() / (1 - 1 / 50)
    assert abs(rate - 0.15) < 0.005, rate
    n = chosen.sum().item()
    masked = (inp[chosen] == mask_id).sum().item() / n
    kept = (inp[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1 - 0.1 / vocab) < 0.01 and abs(replaced - 0.1) < 0.01
    assert (inp[~chosen] == ids[~chosen]).all()
    # deterministic per (seed, epoch, index), different across indices
    again, _ = D.mask_tokens(ids, mask_id, vocab, specials, D.sample_generator(0, 0, 0))
    other, _ = D.mask_tokens(ids, mask_id, vocab, specials, D.sample_generator(0, 0, 1))
    assert torch.equal(inp, again) and not torch.equal(inp, other)
    # a short sequence still gets one target
    short_inp, short_lab = D.mask_tokens(
        torch.tensor([2, 7, 9, 2]), mask_id, vocab, {2, 3}, D.sample_generator(5, 0, 0), probability=0.01
    )
    assert (short_lab != -100).sum() >= 1 and short_lab[0] == -100


def test_sampler_deterministic_and_resumable():
    a = D.ResumableSampler(50, 8, seed=3)
    seq = [a.next_batch() for _ in range(15)]  # crosses epochs (6 batches per epoch)
    assert [e for e, _ in seq[:7]] == [0] * 6 + [1]
    assert sorted(sum((b for _, b in seq[:6]), [])) != list(range(48))  # shuffled
    assert len(set(sum((b for _, b in seq[:6]), []))) == 48  # no repeats within an epoch
    assert seq[0][1] != seq[6][1]  # a new permutation per epoch
    b = D.ResumableSampler(50, 8, seed=3)
    for _ in range(9):
        b.next_batch()
    state = b.state_dict()
    c = D.ResumableSampler(50, 8, seed=3)
    c.load_state_dict(state)
    assert [c.next_batch() for _ in range(6)] == seq[9:15]
    with pytest.raises(ValueError, match="global_batch"):
        D.ResumableSampler(50, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        D.ResumableSampler(3, 8)


def test_rank_slices_cover_the_global_batch():
    idx = list(range(24))
    one = D.rank_slices(idx, 6, 2, 0, 2)
    two = D.rank_slices(idx, 6, 2, 1, 2)
    # micro step j: rank 0 then rank 1, consecutive; together the same samples as one process's micro j
    single = D.rank_slices(idx, 12, 2, 0, 1)
    for j in range(2):
        assert sorted(one[j] + two[j]) == sorted(single[j])
    with pytest.raises(ValueError):
        D.rank_slices(idx, 5, 2, 0, 2)


def test_classification_set_and_padding(corpus):
    _, _, tok = corpus
    ds = D.ClassificationSet(["the king", "a much longer line about the queen and the lord"], [0, 2], tok, 8)
    assert ds.num_labels == 3 and all(len(e.ids) <= 8 for e in ds.examples)
    assert all(e.ids[-1] == tok.eos_token_id for e in ds.examples)
    ids, mask = D.pad_batch([e.ids for e in ds.examples], 0)
    assert ids.shape == mask.shape and mask.sum().item() == sum(len(e.ids) for e in ds.examples)
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        D.ClassificationSet(["a", "b"], [0], tok, 8)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules(kind):
    f = schedule.lr_multiplier(kind, warmup=10, total=100, min_ratio=0.1, decay_fraction=0.2)
    vals = [f(s) for s in range(101)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(vals[:10], vals[1:10]))  # warmup rises
    if kind == "cosine":
        assert vals[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert vals[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(vals[10:], vals[11:]))
    elif kind == "wsd":
        assert vals[10:80] == [1.0] * 70 and vals[90] == pytest.approx(0.55) and vals[100] == pytest.approx(0.1)
    else:
        assert vals[10:] == [1.0] * 91
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = schedule.make_scheduler(opt, kind, 10, 100)
    for _ in range(30):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * f(30))
    with pytest.raises(ValueError, match="unknown kind"):
        schedule.lr_multiplier("linear", 1, 10)


def test_config_files_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        '[train]\nobjective = "clm"\nmodel = "gpt2-tiny"\ndata = "x.txt"\nmax_steps = 7\n'
        "model_overrides = {n_layers = 3}\n"
    )
    cfg = TrainConfig.load(toml, {"lr": 1e-3})
    assert cfg.max_steps == 7 and cfg.data == ["x.txt"] and cfg.lr == 1e-3 and cfg.model_overrides == {"n_layers": 3}
    yml = tmp_path / "c.yaml"
    yml.write_text("objective: mlm\nmodel: bert-tiny\ndata: [a.txt, b.txt]\nprecision: bf16\n")
    cfg = TrainConfig.load(yml)
    assert cfg.objective == "mlm" and cfg.data == ["a.txt", "b.txt"] and cfg.precision == "bf16"
    assert parse_override("compile", "true") is True and parse_override("lr", "0.5") == 0.5
    assert parse_override("data", "a,b") == ["a", "b"] and parse_override("backend", "none") is None
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "gpt2-tiny"\ndata = "x"\nlearning_rate = 3\n')
    with pytest.raises(ValueError, match="unknown key.*learning_rate"):
        TrainConfig.load(bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(model="gpt2-tiny", data=["x"], precision="fp8")
    with pytest.raises(ValueError, match="exactly one of model"):
        TrainConfig(model="gpt2-tiny", init="minilm-l6", data=["x"])


def test_shakespeare_corpus_and_genres():
    sh = pytest.importorskip("plm_engine.training.shakespeare")
    try:
        files = sh.text_files()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import sys

    assert "shakespeare" not in sys.modules  # the Python-2 module is never imported
    assert all(f.endswith("_gut.txt") for f in files) and len(files) >= 37
    names = {sh.work_name(f) for f in files}
    assert set(sh.FIRST_FOLIO_GENRE) <= names and "sonnets" in names
    counts = {g: list(sh.FIRST_FOLIO_GENRE.values()).count(g) for g in sh.GENRES}
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
    train, evals = sh.genre_passages(passage_lines=40)
    assert set(train["play"]).isdisjoint(evals["play"]) and set(evals["play"]) == set(sh.EVAL_PLAYS)
    assert set(train["label"]) == set(evals["label"]) == {0, 1, 2}
    assert all(len(t.splitlines()) == 40 for t in train["text"][:50])
    # the validation plays: one training play per genre, none held out
    assert sorted(sh.FIRST_FOLIO_GENRE[p] for p in sh.VAL_PLAYS) == list(sh.GENRES)
    assert set(sh.VAL_PLAYS).isdisjoint(sh.EVAL_PLAYS)
    rest, val = sh.take_plays(train, sh.VAL_PLAYS)
    assert set(val["play"]) == set(sh.VAL_PLAYS) and set(rest["play"]).isdisjoint(sh.VAL_PLAYS)
    assert len(rest["text"]) + len(val["text"]) == len(train["text"])
    with pytest.raises(ValueError, match="no passages of play"):
        sh.take_plays(evals, sh.VAL_PLAYS)
    assert os.path.basename(sh.texts_dir()) == "texts"
