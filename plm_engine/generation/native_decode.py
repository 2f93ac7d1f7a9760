"""The CPU decode step as one C++ call: plm_engine._C.DecodeStep (csrc/cpu/decode_step.cpp).

Eager, a batch-1 decode step of a small model spends about half its time in Python (~15 op calls per
layer, each validating, choosing a backend and dispatching). The native step is a plan built once per
(model, KV cache): it holds the model's own weight tensors (no copies) and its shape, checked once, and
each step runs embedding -> layers -> final norm -> lm_head in C++, calling the same CPU kernels as the
eager forward, with the same choice between the C++ linear kernel and F.linear (ops.linear's
KERNEL_MAX_ROWS for the ISA in use at each step). Its logits are the eager step's, bit for bit
(tests/generation/test_native_decode.py).

Planned: the decoder-only Transformer's two pre-norm families, "llama" (RMSNorm, RoPE incl. scaled
tables, GQA, optional biases, tied or separate lm_head) and "gpt2" (LayerNorm, learned positions, GELU,
biases). Anything else (BERT, encoder-decoder models, a module the plan does not know, such as a
training adapter) gets a reason from unsupported_reason() and the runner decodes eagerly.

On by default on the CPU; PLM_ENGINE_NATIVE_DECODE=0 turns it off (and Engine(compile=True) /
PLM_ENGINE_COMPILE=1 select the torch.compile'd step instead, compiled_decode.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from plm_engine.layers.attention import Attention
from plm_engine.layers.kv_cache import KVCache
from plm_engine.layers.linear import Linear, QuantEmbedding, QuantLinear
from plm_engine.layers.mlp import MLP
from plm_engine.layers.norm import LayerNorm, RMSNorm
from plm_engine.ops import extension
from plm_engine.ops.linear import KERNEL_MAX_ROWS

# The order of cpu::Isa (csrc/cpu/isa.h): linear_max_rows is indexed by it.
_ISA_ORDER = ("generic", "avx2", "avx512", "avx512_bf16")
_ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh")
_KERNEL_OPS = ("norm_fwd", "linear_fwd", "rope_", "write_kv_cache", "paged_attn", "swiglu_fwd", "gelu_fwd")


def native_enabled() -> bool:
    """PLM_ENGINE_NATIVE_DECODE: "0" (or false/no/off) turns the native CPU decode step off; on otherwise."""
    return os.environ.get("PLM_ENGINE_NATIVE_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


def _expected_types(model) -> dict[str, tuple[type, ...]]:
    """Every submodule the plan knows, by its name under the model, and its exact classes (a weight may
    be kept in GGUF blocks: QuantLinear, QuantEmbedding)."""
    from plm_engine.models.transformer import Block

    norm = (RMSNorm,) if model.config.arch == "llama" else (LayerNorm,)
    linear, embed = (Linear, QuantLinear), (torch.nn.Embedding, QuantEmbedding)
    want: dict[str, tuple[type, ...]] = {"tok_embed": embed, "layers": (torch.nn.ModuleList,), "final_norm": norm}
    if model.config.arch == "gpt2":
        want["pos_embed"] = (torch.nn.Embedding,)
    if model.lm_head is not None:
        want["lm_head"] = linear
    for i in range(len(model.layers)):
        p = f"layers.{i}"
        want.update({p: (Block,), f"{p}.attn_norm": norm, f"{p}.mlp_norm": norm, f"{p}.attn": (Attention,)})
        want.update({f"{p}.attn.qkv": linear, f"{p}.attn.out": linear, f"{p}.mlp": (MLP,)})
        want.update({f"{p}.mlp.up": linear, f"{p}.mlp.down": linear})
    return want


def _model_dtype(model) -> torch.dtype:
    e = model.tok_embed
    return e.dtype if isinstance(e, QuantEmbedding) else e.weight.dtype


def _matrix(m) -> tuple[torch.Tensor, int]:
    """A Linear / Embedding's weight for the plan, and its ggml type (-1: a plain tensor)."""
    if isinstance(m, (QuantLinear, QuantEmbedding)):
        return m.qweight, m.qtype
    return m.weight, -1


def unsupported_reason(model, kv_cache: KVCache) -> str | None:
    """Why the native step cannot run this model and cache (None: it can)."""
    from plm_engine.models.transformer import Transformer

    mod, why = extension.load()
    if mod is None or not hasattr(mod, "DecodeStep"):
        return f"plm_engine._C has no DecodeStep ({why or 'an older build'})"
    missing = [op for op in _KERNEL_OPS if not extension.has_kernel(op, "CPU")]
    if missing:
        return f"no CPU kernel for {', '.join(missing)}"
    if os.environ.get("PLM_ENGINE_BACKEND"):
        return "PLM_ENGINE_BACKEND asks for a backend: the eager ops honour it"
    if type(model) is not Transformer:
        return f"{type(model).__name__} is not a decoder-only Transformer"
    c = model.config
    if c.arch not in ("llama", "gpt2") or not c.causal:
        return f"arch {c.arch!r} is not planned (llama and gpt2 are)"
    if c.activation not in _ACTIVATIONS:
        return f"activation {c.activation!r} is not planned ({', '.join(_ACTIVATIONS)} are)"
    want = _expected_types(model)
    for name, m in model.named_modules():
        if name and type(m) not in want.get(name, ()):
            return f"module {name} ({type(m).__name__}) is not one the plan knows"
    eps = {m.eps for m in model.modules() if isinstance(m, (RMSNorm, LayerNorm))}
    if len(eps) != 1:
        return f"the norms have different eps ({sorted(eps)})"
    layers: list[Any] = list(model.layers)  # Blocks (checked above)
    for layer in layers:
        if (
            layer.post_norm
            or layer.attn.softmax_scale is not None
            or layer.attn.rotary != (c.arch == "llama")
            or layer.mlp.activation != c.activation
        ):
            return "a layer's attention or norm order is not the planned pre-norm block"
    params = [*model.parameters(), *model.buffers()]  # buffers: the blocks of QuantLinear / QuantEmbedding
    dtype = _model_dtype(model)
    if any(p.device.type != "cpu" for p in params) or kv_cache.k[0].device.type != "cpu":
        return "the model or its KV cache is not on the CPU"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not planned"
    if any(not p.is_contiguous() for p in params):
        return "a weight is not contiguous"
    if len(kv_cache.k) != len(model.layers):
        return f"the KV cache has {len(kv_cache.k)} layers, the model {len(model.layers)}"
    return None


class NativeDecode:
    """The decode step of a (model, KV cache) as one C++ call; build it only where unsupported_reason()
    is None (the constructor's C++ checks raise otherwise)."""

    def __init__(self, model, kv_cache: KVCache):
        why = unsupported_reason(model, kv_cache)
        if why is not None:
            raise ValueError(f"NativeDecode: {why}")
        c = model.config
        dtype = _model_dtype(model)
        tok, tok_q = _matrix(model.tok_embed)
        head, head_q = (tok, tok_q) if model.lm_head is None else _matrix(model.lm_head)
        weights = {"tok_embed": tok, "final_norm.weight": model.final_norm.weight, "lm_head": head}
        qtypes = {"tok_embed": [tok_q], "lm_head": [head_q]}
        if c.arch == "gpt2":
            weights["pos_embed"] = model.pos_embed.weight
            weights["final_norm.bias"] = model.final_norm.bias
        modules = {"attn_norm": "attn_norm", "qkv": "attn.qkv", "out": "attn.out", "mlp_norm": "mlp_norm"}
        modules.update({"up": "mlp.up", "down": "mlp.down"})
        layer_weights: dict[str, list[torch.Tensor]] = {}
        for key, path in modules.items():
            mods = [layer.get_submodule(path) for layer in model.layers]
            if key in ("qkv", "out", "up", "down"):
                mats = [_matrix(m) for m in mods]
                layer_weights[f"{key}.weight"] = [w for w, _ in mats]
                qtypes[f"{key}.weight"] = [q for _, q in mats]
            else:
                layer_weights[f"{key}.weight"] = [m.weight for m in mods]
            bs = [getattr(m, "bias", None) for m in mods]
            if bs[0] is not None:
                layer_weights[f"{key}.bias"] = [b for b in bs if b is not None]
        cos = sin = None
        if c.arch == "llama":
            cos, sin = model.rope_tables(torch.device("cpu"))
        limits = [KERNEL_MAX_ROWS.get(isa, {}).get(dtype, 0) for isa in _ISA_ORDER]
        mod = extension.load()[0]
        assert mod is not None  # unsupported_reason checked it
        self.model, self.kv_cache = model, kv_cache
        self.plan = mod.DecodeStep(
            c.arch,
            c.activation,
            {k: v.detach() for k, v in weights.items()},
            {k: [t.detach() for t in ts] for k, ts in layer_weights.items()},
            kv_cache.k,
            kv_cache.v,
            cos,
            sin,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            float(model.final_norm.eps),
            limits,
            qtypes,
        )

    def step(self, input_ids, positions, slot_mapping, block_table, cache_seqlens) -> torch.Tensor:
        """Logits (n, vocab) of one decode step: the five tensors as PagedBatch holds them (input_ids,
        positions, slot_mapping int64 (n,); block_table int32 (n, max_blocks); cache_seqlens int32 (n,))."""
        return self.plan.step(input_ids, positions, slot_mapping, block_table, cache_seqlens)

    def run(self, input_ids, positions, slots, block_rows, cache_seqlens) -> torch.Tensor:
        """One decode step from the runner's host lists (block_rows: each sequence's block ids)."""
        width = max(len(r) for r in block_rows)
        return self.plan.step(
            torch.tensor(input_ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            torch.tensor(slots, dtype=torch.int64),
            torch.tensor([r + [0] * (width - len(r)) for r in block_rows], dtype=torch.int32),
            torch.tensor(cache_seqlens, dtype=torch.int32),
        )

    def usable_now(self) -> bool:
        """False where the step must run through Python: under a dispatch mode or functorch transform
        (FakeTensorMode, a hot-path detector), which must see every op, and when the model's
        forward_tokens is replaced on the instance (wrapped or instrumented), which the C++ step would
        bypass. The runner decodes eagerly then."""
        return not (
            "forward_tokens" in self.model.__dict__
            or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active()
        )
