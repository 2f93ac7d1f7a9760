"""nn.Linear whose forward is plm_engine.ops.linear: the C++ skinny-GEMM kernel for few-row (decode)
inputs on the CPU, F.linear everywhere else. Parameters, init and state-dict names are nn.Linear's.

QuantLinear and QuantEmbedding hold a weight in GGUF blocks (models/gguf.py reads them so from a .gguf
file, unless load_model(..., dequantize=True)): ops.linear_q multiplies the blocks without
dequantizing the weight first; the embedding dequantizes only the rows it looks up."""

from __future__ import annotations

import torch
from torch import nn

from plm_engine import ops
from plm_engine.ops.reference import GGUF_BLOCKS, dequantize_gguf_ref


class Linear(nn.Linear):
    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class _GGUFBlocks(nn.Module):
    """A (rows, K) weight of ggml block type `qtype` as the buffer qweight (rows, row_bytes) uint8.
    `dtype` is the model's compute dtype: what the layer returns and what `weight` dequantizes to."""

    qweight: torch.Tensor

    def __init__(self, rows: int, k: int, qtype: int, dtype: torch.dtype, device=None):
        super().__init__()
        values, nbytes = GGUF_BLOCKS[qtype]
        if k % values:
            raise ValueError(f"a GGUF block type {qtype} weight needs K divisible by {values}, got {k}")
        self.qtype, self.rows, self.k = qtype, rows, k
        self.register_buffer("qweight", torch.empty(rows, k // values * nbytes, dtype=torch.uint8))
        # An empty tensor that carries the compute dtype through module.to(dtype) (qweight never changes).
        # Not in the state dict, so a loader that builds the module on the meta device and assigns the
        # state gives it its real device here.
        self.register_buffer("_dtype", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (rows, K) weight in the compute dtype (a new tensor: for exports and checks,
        not for the forward)."""
        return dequantize_gguf_ref(self.qweight, self.qtype).to(self.dtype)

    @property
    def type_name(self) -> str:
        from plm_engine.ops.contracts.linear import GGUF_TYPES

        return next(n for n, i in GGUF_TYPES.items() if i == self.qtype)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, k={self.k}, type={self.type_name}"


class QuantLinear(_GGUFBlocks):
    """y = x @ W.T + b with W in GGUF blocks (in_features = K, out_features = rows)."""

    def __init__(self, in_features: int, out_features: int, qtype: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__(out_features, in_features, qtype, dtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_q(x, self.qweight, self.qtype, self.bias)


class QuantEmbedding(_GGUFBlocks):
    """nn.Embedding with its table in GGUF blocks: a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int, dtype: torch.dtype, device=None):
        super().__init__(num_embeddings, embedding_dim, qtype, dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.index_select(0, ids.reshape(-1))
        return dequantize_gguf_ref(rows, self.qtype).to(self.dtype).view(*ids.shape, self.embedding_dim)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h @ table.T: the tied LM head."""
        return ops.linear_q(h, self.qweight, self.qtype)


def weight_format(model: nn.Module) -> str:
    """What the model's weights are, for status lines: "float32", or the GGUF block types kept
    natively (most used first) and the compute dtype, e.g. "Q4_1 + Q8_0 (GGUF, native; float32 compute)"."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, _GGUFBlocks):
            counts[m.type_name] = counts.get(m.type_name, 0) + m.qweight.numel()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    name = str(dtype).removeprefix("torch.")
    if not counts:
        return name
    types = " + ".join(sorted(counts, key=counts.__getitem__, reverse=True))
    return f"{types} (GGUF, native; {name} compute)"
