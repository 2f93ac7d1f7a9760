"""The training loop on tiny models: fused kernels vs the PyTorch reference path (Liger-style convergence),
exact resume, gradient accumulation, activation checkpointing, mixed precision, classification metrics,
checkpoint format and corruption detection."""

from __future__ import annotations

import json
import os

import pytest
import torch

from plm_engine.training import checkpoint as ckpt
from plm_engine.training.trainer import Trainer
from tests.training.helpers import CLASSIFY, keyword_rows, losses, tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def train(tmp, data, stop_at=None, **kw):
    trainer = Trainer(tiny_config(tmp, data, **kw))
    summary = trainer.run(stop_at=stop_at)
    return trainer, summary


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "model,objective", [("gpt2-tiny", "clm"), ("llama-tiny", "clm"), ("bert-tiny", "mlm"), ("bart-tiny", "seq2seq")]
)
def test_convergence_fused_matches_reference(tmp_path, corpus, model, objective):
    """Same seed, same data: the fused kernels and the pure-PyTorch reference ops give the same loss
    curve and the same final weights, and the loss goes down."""
    steps = 15
    kw = dict(model=model, objective=objective, max_steps=steps, seq_len=34 if objective == "mlm" else 32)
    if objective == "seq2seq":
        kw["show_reconstructions"] = 0
    fused, _ = train(tmp_path / "fused", corpus, **kw)
    ref, _ = train(tmp_path / "ref", corpus, backend="torch", **kw)
    lf, lr = losses(fused.logger.jsonl), losses(ref.logger.jsonl)
    assert sorted(lf) == list(range(1, steps + 1))
    for s in lf:
        assert lf[s] == pytest.approx(lr[s], rel=2e-4, abs=2e-4), f"step {s}: fused {lf[s]} vs reference {lr[s]}"
    assert sum(list(lf.values())[-3:]) / 3 < lf[1] - 0.5, f"no learning: {lf}"
    wf, wr = weights(fused), weights(ref)
    for k in wf:
        err = (wf[k] - wr[k]).abs().max().item()
        assert err < 2e-4, f"{k}: final weights differ by {err}"
    # the reference run really ran on the reference ops
    assert os.environ.get("PLM_ENGINE_BACKEND") is None


def test_resume_is_exact(tmp_path, corpus):
    """20 steps straight == 10 steps, a checkpoint, a new Trainer resuming, 10 more: loss for loss."""
    kw = dict(max_steps=20, eval_every=5, model_overrides={"dropout": 0.1})  # dropout: RNG state must resume too
    straight, s1 = train(tmp_path / "a", corpus, **kw)
    first, s2 = train(tmp_path / "b", corpus, stop_at=10, **kw)
    assert s2["step"] == 10 and os.path.basename(s2["checkpoint"]) == "step-00000010"
    resumed, s3 = train(tmp_path / "b", corpus, resume="latest", **kw)
    assert s3["step"] == 20
    la, lb = losses(straight.logger.jsonl), losses(resumed.logger.jsonl)
    assert sorted(lb) == list(range(1, 21))  # the log continues, each step once
    assert [la[s] for s in range(1, 21)] == [lb[s] for s in range(1, 21)]
    ea, eb = losses(straight.logger.jsonl, "eval"), losses(resumed.logger.jsonl, "eval")
    assert ea == eb
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accumulation_matches_a_larger_batch(tmp_path, corpus):
    big, _ = train(tmp_path / "big", corpus, batch_size=4, grad_accum=1, max_steps=6)
    acc, _ = train(tmp_path / "acc", corpus, batch_size=2, grad_accum=2, max_steps=6)
    lb, la = losses(big.logger.jsonl), losses(acc.logger.jsonl)
    for s in lb:
        assert la[s] == pytest.approx(lb[s], rel=1e-4), (s, la[s], lb[s])


def test_activation_checkpointing(tmp_path, corpus):
    plain, _ = train(tmp_path / "plain", corpus, max_steps=5)
    ac, _ = train(tmp_path / "ac", corpus, max_steps=5, activation_checkpointing=True)
    lp, la = losses(plain.logger.jsonl), losses(ac.logger.jsonl)
    assert all(la[s] == pytest.approx(lp[s], rel=1e-5) for s in lp)


def test_bf16_autocast(tmp_path, corpus):
    plain, _ = train(tmp_path / "plain", corpus, max_steps=5)
    lp = losses(plain.logger.jsonl)
    bf, _ = train(tmp_path / "bf16", corpus, max_steps=5, precision="bf16")
    lbf = losses(bf.logger.jsonl)
    assert all(abs(lbf[s] - lp[s]) < 0.05 * lp[s] for s in lp), (lbf, lp)
    assert next(bf.model.parameters()).dtype == torch.float32  # master weights stay fp32


# The classification runs here hold out a quarter of the rows and score every batch of them.
CLASSIFY_EVAL = dict(**CLASSIFY, eval_fraction=0.25, eval_batches=0)


def test_classification_objective(tmp_path):
    data = keyword_rows(tmp_path / "rows.jsonl")
    trainer, summary = train(tmp_path / "run", [str(data)], **CLASSIFY_EVAL, max_steps=30)
    ev = summary["eval"]
    assert set(ev) >= {"accuracy", "macro_f1", "loss"} and ev["n_examples"] == 30
    assert ev["accuracy"] > 0.6, ev  # three well-separated keyword classes
    from plm_engine.models import load_model

    loaded = load_model(summary["checkpoint"])
    assert loaded.config.num_labels == 3


KEEP_BEST = dict(**CLASSIFY_EVAL, max_steps=24, val_fraction=0.2, val_batches=0, eval_every=4, keep_best="macro_f1")


def test_keep_best_selects_on_validation_and_scores_the_eval_split_once(tmp_path):
    """Validation every eval_every steps on rows carved from the training split; best/ holds the weights
    of the best validation macro-F1 (earliest on ties); the run ends with them and the eval split scores
    them once, beside the baselines, with the margin in the summary."""
    from plm_engine.models import load_model
    from plm_engine.training.metrics import classification_report, read_log

    data = keyword_rows(tmp_path / "rows.jsonl", n=160, signal=0.45)
    trainer, summary = train(tmp_path / "run", [data], save_every=4, keep_last=10, baselines=True, **KEEP_BEST)
    # 160 rows: 40 eval; of the 120 training rows 24 validate and 96 train; the baselines fit on all 120
    assert (len(trainer.eval_set), len(trainer.val_set), len(trainer.train_set)) == (40, 24, 96)
    assert len(trainer.baseline_texts) == 120
    records = read_log(trainer.logger.jsonl)
    vals = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in vals] == [4, 8, 12, 16, 20, 24] and all(r["n_examples"] == 24 for r in vals)
    best = max(vals, key=lambda r: (r["macro_f1"], -r["step"]))
    assert (summary["best"]["step"], summary["best"]["value"]) == (best["step"], best["macro_f1"])
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0] == summary["eval"]  # the eval split is scored once, at the end
    assert summary["eval"]["step"] == best["step"] and summary["eval"]["selected_by"] == "val macro_f1"

    # best/ == the checkpoint of the best step == the model the run ends with; the last checkpoint
    # still holds the last step (for a resume)
    chosen = load_model(summary["best"]["path"]).state_dict()
    at_step = load_model(ckpt.step_dir(trainer.ckpt_root, best["step"])).state_dict()
    final = trainer.model.state_dict()
    assert all(torch.equal(chosen[k], at_step[k]) and torch.equal(chosen[k], final[k].cpu()) for k in chosen)
    rescored = trainer.evaluate()
    assert {k: rescored[k] for k in ("accuracy", "macro_f1")} == {
        k: summary["eval"][k] for k in ("accuracy", "macro_f1")
    }

    bow = summary["baselines"]["bow_logreg"]
    assert summary["margin"]["accuracy"] == pytest.approx(summary["eval"]["accuracy"] - bow["accuracy"])
    assert summary["margin"]["macro_f1"] == pytest.approx(summary["eval"]["macro_f1"] - bow["macro_f1"])
    report = classification_report(summary)
    assert f"the weights of step {best['step']}" in report and "margin over bow_logreg: accuracy" in report


def test_keep_best_resumes(tmp_path):
    """Stopped between validations and resumed: the same selection and the same eval as a straight run."""
    data = keyword_rows(tmp_path / "rows.jsonl", n=160, signal=0.45)
    _, straight = train(tmp_path / "a", [data], **KEEP_BEST)
    _, first = train(tmp_path / "b", [data], stop_at=10, **KEEP_BEST)
    assert first["eval"] == {} and first["best"]["step"] in (4, 8)  # no eval-split score before the end
    _, resumed = train(tmp_path / "b", [data], resume="latest", **KEEP_BEST)
    assert resumed["best"] == {**straight["best"], "path": resumed["best"]["path"]}
    assert resumed["eval"] == straight["eval"]


def test_keep_best_config_errors():
    from plm_engine.training.config import TrainConfig

    with pytest.raises(ValueError, match="keep_best must be one of"):
        TrainConfig(model="bert-tiny", data=["x"], objective="classify", keep_best="f1")
    with pytest.raises(ValueError, match="needs objective='classify'"):
        TrainConfig(model="gpt2-tiny", data=["x"], keep_best="loss")
    with pytest.raises(ValueError, match="eval_every > 0"):
        TrainConfig(model="bert-tiny", data=["x"], objective="classify", keep_best="loss", eval_every=0)


def test_checkpoint_is_loadable_and_corruption_is_detected(tmp_path, corpus):
    trainer, summary = train(tmp_path, corpus, max_steps=4, save_every=1, keep_last=2)
    root = os.path.join(str(tmp_path), "checkpoints")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]  # keep_last
    assert not [d for d in os.listdir(root) if d.startswith(".tmp")]
    path = summary["checkpoint"]
    assert ckpt.verify_checkpoint(path)["step"] == 4
    from plm_engine.models import load_model

    loaded = load_model(path)
    ids = torch.randint(0, 300, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trainer.model(ids).logits, atol=1e-5)
    assert json.load(open(os.path.join(path, "trainer_state.json")))["sampler"]["position"] == 4

    # A flipped byte, a truncated file, a missing manifest: each named, and resume refuses.
    st = os.path.join(path, "model.safetensors")
    data = bytearray(open(st, "rb").read())
    data[-5] ^= 0xFF
    open(st, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt: model.safetensors has sha256"):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(tiny_config(tmp_path, corpus, max_steps=8, resume="latest"))
    prev = ckpt.list_checkpoints(root)[0][1]
    with open(os.path.join(prev, "trainer.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt: trainer.pt has 100 bytes"):
        ckpt.verify_checkpoint(prev)
    os.remove(os.path.join(prev, "manifest.json"))
    with pytest.raises(ckpt.CheckpointError, match="partial"):
        ckpt.verify_checkpoint(prev)
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        ckpt.resolve_resume("latest", str(tmp_path / "empty"))
