"""LP-FT: the head fitted on frozen pooled features (training/probe.py), and the mean pooling a
sentence-transformers model is fine-tuned with (ModelConfig.classifier_pooling)."""

from __future__ import annotations

import pytest
import torch

from plm_engine.training.probe import fit_linear_head
from plm_engine.training.trainer import Trainer
from tests.training.helpers import CLASSIFY, keyword_rows, tiny_config


@pytest.mark.parametrize("bias", [True, False])
def test_fit_linear_head_folds_the_standardisation_exactly(bias):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 7, generator=g) * 2
    y = torch.arange(90) % 3
    x = centres[y] * torch.tensor([1, 10, 0.1, 1, 5, 1, 1]) + 3 + torch.randn(90, 7, generator=g)  # awkward scales
    w, b, rec = fit_linear_head(x, y, 3, bias=bias)
    assert w.shape == (3, 7) and (b is None) == (not bias)
    logits = x @ w.t() + (b if bias else 0)
    acc = (logits.argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(rec["accuracy"]) and acc > 0.9, rec
    assert torch.nn.functional.cross_entropy(logits.double(), y).item() == pytest.approx(rec["loss"], rel=1e-4)


def test_mean_pooling_classifies_the_sentence_embedding_and_round_trips(tmp_path):
    from plm_engine.models import ModelConfig, Transformer, load_model, save_pretrained

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("bert-tiny", num_labels=3, classifier_pooling="mean")).eval()
    ids = torch.randint(5, 500, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        logits = model.classify(ids, mask).logits
        assert torch.allclose(logits, model.classifier(model.embed(ids, mask)), atol=1e-6)
        cls = Transformer(model.config.replace(classifier_pooling=None)).eval()
        cls.load_state_dict(model.state_dict())
        assert not torch.allclose(cls.classify(ids, mask).logits, logits)  # the choice changes what is read
        save_pretrained(model, tmp_path / "m")
        loaded = load_model(tmp_path / "m")
        assert loaded.config.classifier_pooling == "mean"
        assert torch.allclose(loaded.classify(ids, mask).logits, logits, atol=1e-6)
    with pytest.raises(ValueError, match="classifier_pooling must be None or 'mean'"):
        ModelConfig.preset("bert-tiny", classifier_pooling="max")


def _probed_config(tmp_path, **overrides):
    """150 keyword rows, a fifth held out for the eval, and a mean-pooling bert-tiny classifier whose
    head is first fitted on 64 training examples (probe_examples); overrides change the run."""
    data = keyword_rows(tmp_path / "rows.jsonl", n=150)
    probed = dict(eval_fraction=0.2, probe_examples=64, model_overrides={"classifier_pooling": "mean"})
    return data, tiny_config(tmp_path / "run", [data], **{**CLASSIFY, **probed, **overrides})


def test_probe_fits_the_head_the_model_then_uses(tmp_path):
    """probe_examples: the head's weights come from the fit on the model's own pooled features, so the
    model classifies the probed examples as well as the fit did, before any training step."""
    data, cfg = _probed_config(tmp_path)
    trainer = Trainer(cfg)
    from plm_engine.training.metrics import read_log

    (probe,) = [r for r in read_log(trainer.logger.jsonl) if r["split"] == "probe"]
    assert probe["n_examples"] == 64 and probe["accuracy"] > 0.5, probe
    pick = torch.randperm(len(trainer.train_set), generator=torch.Generator().manual_seed(cfg.seed + 3))[:64]
    trainer.model.eval()
    right = 0
    for i in range(0, 64, 8):
        batch = trainer._collate(pick[i : i + 8].tolist(), 0, trainer.train_set)
        with torch.no_grad():
            out = trainer.model.classify(batch["input_ids"], batch.get("attention_mask"))
        right += int((out.logits.argmax(-1) == batch["labels"]).sum())
    assert right / 64 == pytest.approx(probe["accuracy"], abs=1 / 64)  # float32 head vs float64 fit: a tie at most
    from plm_engine.training.config import TrainConfig

    fresh = Trainer(TrainConfig(**{**cfg.to_dict(), "probe_examples": 0, "out_dir": str(tmp_path / "fresh")}))
    assert not torch.equal(fresh.model.classifier.weight, trainer.model.classifier.weight)
    with pytest.raises(ValueError, match="probe_examples must be >= -1 and needs objective='classify'"):
        tiny_config(tmp_path / "x", [data], probe_examples=8)


def _llama_checkpoint(path, n_layers: int = 3) -> str:
    from plm_engine.models import ModelConfig, Transformer, save_pretrained

    torch.manual_seed(1)
    save_pretrained(Transformer(ModelConfig.preset("llama-tiny", n_layers=n_layers)), path)
    return str(path)


def test_smaller_n_layers_keeps_the_checkpoints_lowest_blocks(tmp_path):
    """init with model_overrides n_layers below the checkpoint's: a truncated trunk (the lowest blocks,
    then the final norm), not an error; more layers than the checkpoint has still fail."""
    from plm_engine.models import load_model

    data = keyword_rows(tmp_path / "rows.jsonl", n=60)
    init = _llama_checkpoint(tmp_path / "ckpt")
    kw = {**CLASSIFY, "model": None, "init": init, "eval_fraction": 0.2}
    trainer = Trainer(tiny_config(tmp_path / "run", [data], **kw, model_overrides={"n_layers": 2}))
    full = load_model(init).state_dict()
    mine = trainer.model.state_dict()
    assert len(trainer.model.layers) == 2 and not any(k.startswith("layers.2.") for k in mine)
    for k, v in mine.items():
        if not k.startswith("classifier."):
            assert torch.equal(v, full[k]), k
    with pytest.raises(ValueError, match="does not fit the model config"):
        Trainer(tiny_config(tmp_path / "more", [data], **kw, model_overrides={"n_layers": 4}))


def test_keep_best_validates_the_probed_head_before_fine_tuning(tmp_path):
    """LP-FT with keep_best: step 0 (the probed head on the frozen model) is validated and kept when no
    fine-tuning step beats it, here a learning rate that wrecks the model."""
    _, cfg = _probed_config(
        tmp_path,
        lr=5.0,
        max_steps=4,
        warmup_steps=0,
        eval_every=2,
        keep_best="macro_f1",
        val_fraction=0.3,
        val_batches=0,
    )
    trainer = Trainer(cfg)
    summary = trainer.run()
    from plm_engine.training.metrics import read_log

    vals = {r["step"]: r["macro_f1"] for r in read_log(summary["log"]) if r["split"] == "val"}
    assert sorted(vals) == [0, 2, 4]
    assert summary["best"]["step"] == max(vals, key=lambda s: (vals[s], -s)), vals
    assert summary["eval"]["step"] == summary["best"]["step"]
    assert vals[0] > max(vals[2], vals[4]), vals  # lr 5 destroys what the probe found
    assert summary["best"]["step"] == 0


@pytest.mark.parametrize("keep_best", ["", "macro_f1"])
def test_max_steps_0_is_a_linear_probe_on_the_frozen_model(tmp_path, keep_best):
    """max_steps = 0 with probe_examples = -1: every training example fits the head, no step changes the
    model, and the eval scores the probed head (validated once, at step 0, under keep_best)."""
    from plm_engine.training.metrics import read_log

    data = keyword_rows(tmp_path / "rows.jsonl", n=150)
    kw = dict(CLASSIFY, eval_fraction=0.2, eval_every=5, keep_best=keep_best, val_fraction=0.3, val_batches=0)
    cfg = tiny_config(tmp_path / "run", [data], **kw, max_steps=0, probe_examples=-1)
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    log = read_log(summary["log"])
    (probe,) = [r for r in log if r["split"] == "probe"]
    assert probe["n_examples"] == len(trainer.train_set) and probe["accuracy"] > 0.6, probe
    assert not [r for r in log if r["split"] == "train"]
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert summary["step"] == 0 and summary["eval"]["step"] == 0 and summary["eval"]["accuracy"] > 0.6
    assert len([r for r in log if r["split"] == "val"]) == (1 if keep_best else 0)
    if keep_best:
        assert summary["best"]["step"] == 0 and summary["eval"]["selected_by"] == "val macro_f1"
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        tiny_config(tmp_path / "x", [data], **CLASSIFY, max_steps=0)
    with pytest.raises(ValueError, match="probe_l2 must be >= 0"):
        tiny_config(tmp_path / "x", [data], **CLASSIFY, probe_examples=8, probe_l2=-1.0)
