"""nn.Linear whose forward is plm_engine.ops.linear: the C++ skinny-GEMM kernel for few-row (decode)
inputs on the CPU, F.linear everywhere else. Parameters, init and state-dict names are nn.Linear's."""

from __future__ import annotations

from torch import nn

from plm_engine import ops


class Linear(nn.Linear):
    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)
