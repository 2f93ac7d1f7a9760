"""LayerNorm and RMSNorm modules over the fused ops, with the fused residual add.

norm(x) returns norm(x); norm(x, residual=r) returns (norm(x + r), x + r) — the pre-norm transformer's
residual stream update and the next sublayer's input in one pass.

Under autocast the residual stream stays in the wider dtype (float32 from the embeddings) while the
sublayers return bfloat16/float16: the sublayer output is promoted to the stream's dtype, so the sum
is never rounded to 16 bits.
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
        return ops.layer_norm(_like(x, residual), self.weight, self.bias, eps=self.eps, residual=residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        return ops.rms_norm(_like(x, residual), self.weight, eps=self.eps, residual=residual)


def _like(x, residual):
    return x if residual is None or residual.dtype == x.dtype else x.to(residual.dtype)
