"""The Shakespeare genre demo (configs/shakespeare_genre.toml).

The fast test runs the shipped config shortened (the head fitted on a seeded sample of the training
passages, a seeded sample of the held-out plays scored) and bounds what it reaches, so a change that
weakens the demo (config, trainer, data, model) fails here rather than in a user's run; the bound sits
below the lowest of several seeds (docs/genre_demo.md). The slow test runs the demo as shipped and
requires it to beat bag-of-words logistic regression by issue 18's 5 points on accuracy and macro-F1
over every held-out passage, margin reported."""

from __future__ import annotations

import os

import pytest

from plm_engine.training.config import TrainConfig
from plm_engine.training.metrics import classification_report, read_log
from plm_engine.training.trainer import Trainer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "shakespeare_genre.toml")
# The shortened run fits the head on 1024 sampled training passages (the shipped run: all 12,698) and
# scores 320 sampled held-out passages, without the baselines (bag-of-words on every training passage
# costs more than the rest of the run).
SHORT = dict(probe_examples=1024, eval_batches=10, baselines=False)
# The shortened run's accuracy and macro-F1 on its sampled held-out passages must reach this
# (docs/genre_demo.md: seeds 0-2 measured); a head that learned nothing scores ~0.33 / <= 0.25.
SHORT_MIN_SCORE = 0.58
# The shipped run's margin over bag-of-words on every held-out passage (fractions, not points): issue 18
# point 5's 5 points.
FULL_MIN_MARGIN = 0.05


def _need_demo_data():
    from plm_engine.models.registry import default_model_path
    from plm_engine.training import shakespeare

    try:
        shakespeare.texts_dir()
        default_model_path("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))


def run_demo(out_dir, **overrides) -> dict:
    cfg = TrainConfig.load(CONFIG, {"out_dir": str(out_dir), "progress": False, "plot": False, **overrides})
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _check_summary(summary: dict) -> dict:
    ev, bow, margin = summary["eval"], summary["baselines"]["bow_logreg"], summary["margin"]
    assert summary["step"] == 0 and ev["step"] == 0  # the probed head on the frozen model, no fine-tuning
    assert margin["baseline"] == "bow_logreg"
    assert margin["accuracy"] == pytest.approx(ev["accuracy"] - bow["accuracy"])
    assert margin["macro_f1"] == pytest.approx(ev["macro_f1"] - bow["macro_f1"])
    assert "margin over bow_logreg: accuracy" in classification_report(summary)
    return margin


def test_shortened_genre_demo_is_bounded(tmp_path):
    _need_demo_data()
    summary = run_demo(tmp_path, seed=0, **SHORT)
    ev = summary["eval"]
    assert ev["n_examples"] == SHORT["eval_batches"] * TrainConfig.load(CONFIG).batch_size
    probe = [r for r in read_log(summary["log"]) if r["split"] == "probe"]
    assert [r["n_examples"] for r in probe] == [SHORT["probe_examples"]]
    report = classification_report(summary)
    assert ev["accuracy"] >= SHORT_MIN_SCORE and ev["macro_f1"] >= SHORT_MIN_SCORE, report


@pytest.mark.slow
def test_genre_demo_beats_bag_of_words(tmp_path):
    _need_demo_data()
    summary = run_demo(tmp_path)
    margin = _check_summary(summary)
    report = classification_report(summary)
    assert margin["accuracy"] >= FULL_MIN_MARGIN and margin["macro_f1"] >= FULL_MIN_MARGIN, report
