"""Reference points for a classification fine-tune: the majority class, and bag-of-words logistic
regression (scikit-learn is not a dependency: a softmax regression over word counts, in torch)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from plm_engine.training.metrics import classification_scores

_WORD = re.compile(r"[a-z']+")


def majority_baseline(train_labels: Sequence[int], eval_labels: Sequence[int], num_labels: int) -> dict:
    """Always predict the most frequent training label."""
    top = Counter(train_labels).most_common(1)[0][0]
    y = torch.tensor(list(eval_labels))
    return {"predicts": int(top), **classification_scores(torch.full_like(y, top), y, num_labels)}


def _bow(texts: Sequence[str], vocab: dict[str, int]) -> torch.Tensor:
    """log(1 + count) of each vocabulary word per text, L2-normalised rows, as a sparse (n, len(vocab))
    matrix (dense would be tens of thousands of passages x the vocabulary)."""
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        feats = {vocab[w]: c for w, c in Counter(_WORD.findall(t.lower())).items() if w in vocab}
        v = torch.log1p(torch.tensor(list(feats.values()), dtype=torch.float32))
        v = v / v.norm().clamp_min(1e-6)
        rows += [i] * len(feats)
        cols += list(feats)
        vals.append(v)
    idx = torch.tensor([rows, cols], dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (len(texts), len(vocab)), check_invariants=True).coalesce()


def bow_logreg_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    eval_texts: Sequence[str],
    eval_labels: Sequence[int],
    num_labels: int,
    max_vocab: int = 20000,
    l2: float = 1e-4,
    iters: int = 100,
) -> dict:
    """Multinomial logistic regression on bag-of-words features of the training texts (the max_vocab most
    frequent lower-cased words), L2-regularised, fitted with L-BFGS; scored on the eval texts."""
    counts = Counter(w for t in train_texts for w in set(_WORD.findall(t.lower())))
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common(max_vocab))}
    xt, xe = _bow(train_texts, vocab), _bow(eval_texts, vocab)
    yt, ye = torch.tensor(list(train_labels)), torch.tensor(list(eval_labels))
    w = torch.zeros(len(vocab), num_labels, requires_grad=True)
    b = torch.zeros(num_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch.sparse.mm(xt, w) + b, yt) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (torch.sparse.mm(xe, w) + b).argmax(1)
    return {"vocab": len(vocab), **classification_scores(pred, ye, num_labels)}
