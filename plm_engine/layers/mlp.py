"""The feed-forward block: GELU (GPT-2, BERT, BART), SwiGLU (Llama), gated GELU (T5 v1.1) over the fused
activation ops, or ReLU / SiLU (T5, Marian)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from plm_engine import ops
from plm_engine.layers.linear import Linear


class MLP(nn.Module):
    """down(act(up(x))); for SwiGLU and GeGLU `up` is the fused [gate; up] projection (2 * intermediate
    rows), so one matmul feeds both halves and the activation reads them as views."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.activation = activation
        self.gated = activation in ("swiglu", "geglu")
        self.up = Linear(dim, 2 * hidden if self.gated else hidden, bias=bias)
        self.down = Linear(hidden, dim, bias=bias)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = ops.swiglu(gate, up) if self.activation == "swiglu" else ops.gelu(gate, approximate="tanh") * up
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "silu":
            h = F.silu(h)
        else:
            h = ops.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down(h)
