"""The feed-forward block: GELU (GPT-2, BERT) or SwiGLU (Llama) over the fused activation ops."""

from __future__ import annotations

from torch import nn

from plm_engine import ops
from plm_engine.layers.linear import Linear


class MLP(nn.Module):
    """down(act(up(x))); for SwiGLU `up` is the fused [gate; up] projection (2 * intermediate rows),
    so one matmul feeds both halves and ops.swiglu reads them as views."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.activation = activation
        self.gated = activation == "swiglu"
        self.up = Linear(dim, 2 * hidden if self.gated else hidden, bias=bias)
        self.down = Linear(hidden, dim, bias=bias)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = ops.swiglu(gate, up)
        else:
            h = ops.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down(h)
