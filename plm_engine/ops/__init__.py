"""The kernel layer: the public functional API, and the only place a backend is chosen.

from plm_engine import ops
y = ops.rms_norm(x, weight)                      # automatic backend
y, h = ops.layer_norm(x, w, b, residual=r)       # fused residual add + norm
y = ops.layer_norm(x, w, backend="torch")        # the PyTorch reference
"""

from plm_engine.ops.activations import gelu, swiglu
from plm_engine.ops.attention import (
    RelativePositionBias,
    attention,
    attention_varlen,
    paged_attention,
    relative_position_bucket,
    write_kv_cache,
)
from plm_engine.ops.backends import BACKENDS, BackendUnavailable, usable_backends
from plm_engine.ops.cross_entropy import cross_entropy, linear_cross_entropy
from plm_engine.ops.linear import linear, linear_q
from plm_engine.ops.norms import layer_norm, rms_norm
from plm_engine.ops.rope import rope, rope_cos_sin, rope_inv_freq
from plm_engine.ops.softmax import softmax
from plm_engine.ops.token_mask import apply_token_bitmask_

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "RelativePositionBias",
    "apply_token_bitmask_",
    "attention",
    "attention_varlen",
    "cross_entropy",
    "gelu",
    "layer_norm",
    "linear",
    "linear_q",
    "linear_cross_entropy",
    "paged_attention",
    "relative_position_bucket",
    "rms_norm",
    "rope",
    "rope_cos_sin",
    "rope_inv_freq",
    "softmax",
    "swiglu",
    "usable_backends",
    "write_kv_cache",
]
