"""Model building blocks over plm_engine.ops: norms, attention (dense, packed, paged), MLP, KV cache."""

from plm_engine.layers.attention import Attention, AttentionContext, CrossAttention, CrossKV
from plm_engine.layers.kv_cache import KVCache, PagedBatch
from plm_engine.layers.linear import Linear
from plm_engine.layers.mlp import MLP
from plm_engine.layers.norm import LayerNorm, RMSNorm

__all__ = [
    "MLP",
    "Attention",
    "AttentionContext",
    "CrossAttention",
    "CrossKV",
    "KVCache",
    "LayerNorm",
    "Linear",
    "PagedBatch",
    "RMSNorm",
]
