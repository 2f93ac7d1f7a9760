"""Linear probing before fine-tuning (LP-FT, Kumar et al., ICLR 2022): fit the new classification head
by logistic regression on the frozen pretrained model's pooled features, then fine-tune everything.

A freshly initialised head sends large, arbitrary gradients into the pretrained layers in the first
steps and distorts the features the model brings; a head that already separates the classes starts the
fine-tune near a low loss, so the features change less and carry better to data unlike the training
set (here: plays the model never saw).
"""

from __future__ import annotations

import torch


def fit_linear_head(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, bias: bool = True, l2: float = 0.1, iters: int = 200
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(weight (num_labels, d), bias (num_labels,) or None, fit record) of an L2-regularised multinomial
    logistic regression on (n, d) features, fitted with L-BFGS on standardised features (better
    conditioned) and folded back to act on the raw ones. Without a bias the features are only scaled,
    not centred, so the fold stays exact."""
    x = features.double()
    y = labels.long()
    mu = x.mean(0) if bias else torch.zeros(x.shape[1], dtype=x.dtype)
    sd = x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_labels, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=bias)
    opt = torch.optim.LBFGS([w, b] if bias else [w], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = z @ w + b
        record = {
            "loss": torch.nn.functional.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).double().mean().item(),
            "n_examples": int(y.numel()),
        }
        weight = (w / sd[:, None]).t()  # z @ w + b == x @ (w / sd) + (b - (mu / sd) @ w)
        shift = b - (mu / sd) @ w
    return weight.float(), shift.float() if bias else None, record
