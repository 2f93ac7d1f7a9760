"""Learning-rate schedules as multipliers of the peak lr, for torch.optim.lr_scheduler.LambdaLR.

LambdaLR keeps only its step count in state_dict(), so a resumed run recomputes the same lr from the
restored count; the lambdas below are pure functions of the step.
"""

from __future__ import annotations

import functools
import math

import torch


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 1/warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, warmup: int, total: int, min_ratio: float, decay_fraction: float) -> float:
    """WSD (MiniCPM): linear warmup, a constant plateau, then a linear decay to `min_ratio` over the final
    `decay_fraction` of the steps. The plateau lets a run be extended from any checkpoint before the decay."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, round(decay_fraction * total))
    decay_start = max(warmup, total - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0 - (1.0 - min_ratio) * progress


def constant_with_warmup(step: int, warmup: int) -> float:
    return (step + 1) / warmup if step < warmup else 1.0


def lr_multiplier(kind: str, warmup: int, total: int, min_ratio: float = 0.1, decay_fraction: float = 0.2):
    """The step -> multiplier function of schedule `kind` ("cosine", "wsd", "constant")."""
    if warmup < 0 or total < 1:
        raise ValueError(f"lr schedule: need warmup >= 0 and total >= 1, got warmup={warmup} total={total}")
    if kind == "cosine":
        return functools.partial(warmup_cosine, warmup=warmup, total=total, min_ratio=min_ratio)
    if kind == "wsd":
        return functools.partial(
            warmup_stable_decay, warmup=warmup, total=total, min_ratio=min_ratio, decay_fraction=decay_fraction
        )
    if kind == "constant":
        return functools.partial(constant_with_warmup, warmup=warmup)
    raise ValueError(f"lr schedule: unknown kind {kind!r} (cosine, wsd, constant)")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    warmup: int,
    total: int,
    min_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(kind, warmup, total, min_ratio, decay_fraction))
