"""LayerNorm and RMSNorm modules over the fused ops, with the fused residual add.

norm(x) returns norm(x); norm(x, residual=r) returns (norm(x + r), x + r) — the pre-norm transformer's
residual stream update and the next sublayer's input in one pass.
"""

from __future__ import annotations

import torch
from torch import nn

from plm_engine import ops


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x, residual=None):
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        return ops.rms_norm(x, self.weight, eps=self.eps, residual=residual)
