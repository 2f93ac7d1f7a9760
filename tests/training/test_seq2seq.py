"""The seq2seq objective (BART-style denoising) on a tiny BART: the reconstruction loss falls, a resumed
run equals a straight one loss for loss, the checkpoint loads as a Seq2SeqTransformer, and the run ends
with reconstructions; the noising itself is checked on its own."""

from __future__ import annotations

import pytest
import torch

from plm_engine.training import data as D
from plm_engine.training.trainer import Trainer
from tests.training.helpers import losses, tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")), n_files=2, lines=200)


def run(tmp, data, stop_at=None, **kw):
    base = dict(objective="seq2seq", model="bart-tiny", seq_len=32, lr=3e-3, eval_every=4, show_reconstructions=2)
    trainer = Trainer(tiny_config(tmp, data, **{**base, **kw}))
    return trainer, trainer.run(stop_at=stop_at)


def test_denoising_trains_and_resumes_exactly(tmp_path, corpus):
    kw = dict(max_steps=12, model_overrides={"dropout": 0.1})  # dropout: the RNG state must resume too
    straight, summary = run(tmp_path / "a", corpus, **kw)
    ls = losses(straight.logger.jsonl)
    assert sorted(ls) == list(range(1, 13))
    assert sum(ls[s] for s in (10, 11, 12)) / 3 < ls[1] - 0.8, f"the reconstruction loss does not fall: {ls}"
    ev = losses(straight.logger.jsonl, "eval")
    assert ev[12] < ev[4], ev
    recs = summary["reconstructions"]
    assert len(recs) == 2 and all(set(r) == {"noised", "reconstruction", "original"} for r in recs)
    assert all("<mask>" in r["noised"] and r["original"] for r in recs)

    first, s1 = run(tmp_path / "b", corpus, stop_at=8, **kw)  # on an eval step
    assert s1["step"] == 8
    resumed, _ = run(tmp_path / "b", corpus, resume="latest", **kw)
    lr = losses(resumed.logger.jsonl)
    assert [lr[s] for s in range(1, 13)] == [ls[s] for s in range(1, 13)]
    assert losses(resumed.logger.jsonl, "eval") == ev
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    from plm_engine.models import Seq2SeqTransformer, load_model

    loaded = load_model(summary["checkpoint"])
    assert isinstance(loaded, Seq2SeqTransformer)
    src, tgt = torch.randint(3, 300, (2, 9)), torch.randint(3, 300, (2, 5))
    straight.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(src, decoder_input_ids=tgt).logits, straight.model(src, decoder_input_ids=tgt).logits
        )


def test_objective_and_arch_must_fit(tmp_path, corpus):
    with pytest.raises(ValueError, match="encoder-decoder archs"):
        Trainer(tiny_config(tmp_path / "a", corpus, objective="seq2seq", model="gpt2-tiny"))
    with pytest.raises(ValueError, match="needs a causal model"):
        Trainer(tiny_config(tmp_path / "b", corpus, objective="clm", model="t5-tiny"))


def test_denoising_source():
    ids = torch.arange(10, 50)
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 40):
        m = D.noise_span_mask(n, 0.3, 3.0, g)
        assert 0 < int(m.sum()) < n
    mask = D.noise_span_mask(40, 0.3, 3.0, torch.Generator().manual_seed(1))
    assert int(mask.sum()) == 12
    src = D.denoising_source(ids, 99, 2, torch.Generator().manual_seed(1), 0.3, 3.0)
    assert src[-1] == 2 and int((src == 99).sum()) == int((mask & ~torch.cat([mask[:1] & False, mask[:-1]])).sum())
    kept = src[(src != 99) & (src != 2)]
    assert kept.tolist() == ids[~mask].tolist()  # the unmasked text, in order
    assert torch.equal(src, D.denoising_source(ids, 99, 2, torch.Generator().manual_seed(1), 0.3, 3.0))
    ends = torch.tensor([14, 29])  # sentences 10..14, 15..29, 30..49 come back whole, in another order
    perm = D.permute_sentences(ids, ends, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == ids.tolist() and perm.tolist() != ids.tolist()
    pieces = {tuple(range(10, 15)), tuple(range(15, 30)), tuple(range(30, 50))}
    bounds = [0] + [i + 1 for i, t in enumerate(perm.tolist()) if t in (14, 29, 49)]
    assert {tuple(perm[a:b].tolist()) for a, b in zip(bounds, bounds[1:])} == pieces
