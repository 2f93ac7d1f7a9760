"""Our parameters under transformers' names, both ways, and save_pretrained.

Our parameter names differ from HF's where we fuse projections (q/k/v into attn.qkv, gate/up into
mlp.up) or where GPT-2 stores Conv1D (transposed) weights; param_map is the one place that knows both
naming schemes. models/loading.py reads checkpoints through it; save_pretrained writes what transformers
(and load_model) loads back. This module never imports the model class, so the model can save itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from plm_engine.models.config import ModelConfig

if TYPE_CHECKING:
    from plm_engine.models.transformer import Transformer

_PREFIXES = ("model.", "transformer.", "bert.")


def param_map(c: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(our name, HF names without the model prefix, how to combine: "copy" | "T" | "cat") per tensor."""
    m: list[tuple[str, list[str], str]] = []
    add = lambda ours, hf, mode="copy": m.append((ours, hf if isinstance(hf, list) else [hf], mode))
    wb = ("weight", "bias")
    if c.arch == "llama":
        add("tok_embed.weight", "embed_tokens.weight")
        for i in range(c.n_layers):
            p, h = f"layers.{i}.", f"layers.{i}."
            add(p + "attn_norm.weight", h + "input_layernorm.weight")
            add(p + "mlp_norm.weight", h + "post_attention_layernorm.weight")
            for s in wb[: 1 + c.qkv_bias]:
                add(p + f"attn.qkv.{s}", [h + f"self_attn.{x}_proj.{s}" for x in "qkv"], "cat")
            for s in wb[: 1 + c.out_bias]:
                add(p + f"attn.out.{s}", h + f"self_attn.o_proj.{s}")
            for s in wb[: 1 + c.mlp_bias]:
                add(p + f"mlp.up.{s}", [h + f"mlp.gate_proj.{s}", h + f"mlp.up_proj.{s}"], "cat")
                add(p + f"mlp.down.{s}", h + f"mlp.down_proj.{s}")
        add("final_norm.weight", "norm.weight")
        if not c.tie_word_embeddings:
            add("lm_head.weight", "lm_head.weight")
        if c.num_labels:
            add("classifier.weight", "score.weight")
    elif c.arch == "gpt2":
        add("tok_embed.weight", "wte.weight")
        add("pos_embed.weight", "wpe.weight")
        for i in range(c.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            for s in wb:  # Conv1D stores (in, out): transpose the weights
                mode = "T" if s == "weight" else "copy"
                add(p + f"attn_norm.{s}", h + f"ln_1.{s}")
                add(p + f"mlp_norm.{s}", h + f"ln_2.{s}")
                add(p + f"attn.qkv.{s}", h + f"attn.c_attn.{s}", mode)
                add(p + f"attn.out.{s}", h + f"attn.c_proj.{s}", mode)
                add(p + f"mlp.up.{s}", h + f"mlp.c_fc.{s}", mode)
                add(p + f"mlp.down.{s}", h + f"mlp.c_proj.{s}", mode)
        for s in wb:
            add(f"final_norm.{s}", f"ln_f.{s}")
        if not c.tie_word_embeddings:
            add("lm_head.weight", "lm_head.weight")
        if c.num_labels:
            add("classifier.weight", "score.weight")
    else:  # bert
        e = "embeddings."
        add("tok_embed.weight", e + "word_embeddings.weight")
        add("pos_embed.weight", e + "position_embeddings.weight")
        if c.type_vocab_size:
            add("type_embed.weight", e + "token_type_embeddings.weight")
        for s in wb:
            add(f"embed_norm.{s}", e + f"LayerNorm.{s}")
        for i in range(c.n_layers):
            p, h = f"layers.{i}.", f"encoder.layer.{i}."
            for s in wb:
                add(p + f"attn.qkv.{s}", [h + f"attention.self.{x}.{s}" for x in ("query", "key", "value")], "cat")
                add(p + f"attn.out.{s}", h + f"attention.output.dense.{s}")
                add(p + f"attn_norm.{s}", h + f"attention.output.LayerNorm.{s}")
                add(p + f"mlp.up.{s}", h + f"intermediate.dense.{s}")
                add(p + f"mlp.down.{s}", h + f"output.dense.{s}")
                add(p + f"mlp_norm.{s}", h + f"output.LayerNorm.{s}")
        if c.pooler:
            for s in wb:
                add(f"pooler.{s}", f"pooler.dense.{s}")
        if c.mlm_head:
            t = "cls.predictions."
            for s in wb:
                add(f"mlm_dense.{s}", t + f"transform.dense.{s}")
                add(f"mlm_norm.{s}", t + f"transform.LayerNorm.{s}")
            add("mlm_bias", t + "bias")
            if not c.tie_word_embeddings:
                add("lm_head.weight", t + "decoder.weight")
        if c.num_labels:
            for s in wb:
                add(f"classifier.{s}", f"classifier.{s}")
    return m


# config.json's quantization_config.quant_method of a folder whose listed weights are GGUF blocks.
BLOCKS_QUANT_METHOD = "plm_engine_gguf_blocks"


def hf_prefix(c: ModelConfig) -> str:
    """The prefix transformers' model class for this config puts on the trunk's tensor names."""
    arch = c.hf_architecture()
    if c.arch == "bert":
        return "" if arch == "BertModel" else "bert."
    return "transformer." if c.arch == "gpt2" else "model."


def strip_prefix(name: str) -> str:
    """An HF tensor name without the model-class prefix (old BERT checkpoints say gamma/beta)."""
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
            break
    if "LayerNorm" in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names (q/k/v and gate/up split, GPT-2 Conv1D transposed).
    A weight kept in GGUF blocks comes out as its blocks (uint8 rows; hf_block_types names their types).
    Encoder-decoder models (a Seq2SeqTransformer) map through models/seq2seq_hf.py."""
    return _hf_tensors(model)[0]


def hf_block_types(model: Transformer) -> dict[str, str]:
    """{transformers name: GGUF block type} of the weights hf_state_dict gives as blocks."""
    return _hf_tensors(model)[1]


def _hf_tensors(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    c = model.config
    if c.is_encoder_decoder:
        from plm_engine.models import seq2seq_hf

        return seq2seq_hf.hf_state_dict(model), {}
    ours = model.state_dict()
    prefix = hf_prefix(c)
    out, types = {}, {}
    for name, hf_names, mode in param_map(c):
        block_type = None
        if name not in ours and name.endswith(".weight"):  # a QuantLinear / QuantEmbedding: its blocks
            module = model.get_submodule(name.removesuffix(".weight"))
            name, block_type = name.removesuffix("weight") + "qweight", module.type_name
            if mode in ("T", "row"):  # loading keeps blocks only where rows are taken as they are
                raise ValueError(f"save_pretrained: {name} in GGUF blocks cannot be written as {hf_names[0]}")
        t = ours[name]
        if mode == "T":
            parts = [t.t()]
        elif mode == "cat":
            if name.startswith("layers.") and ".attn.qkv." in name:
                sizes = [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
            else:
                sizes = [t.shape[0] // len(hf_names)] * len(hf_names)
            parts = list(t.split(sizes, 0))
        else:
            parts = [t]
        for n, p in zip(hf_names, parts, strict=True):
            top = n.startswith(("lm_head.", "score.", "cls.", "classifier."))
            key = ("" if top else prefix) + n
            out[key] = p.detach().contiguous()
            if block_type is not None:
                types[key] = block_type
    return out, types


def save_pretrained(model: Transformer, path) -> Path:
    """Writes config.json + model.safetensors under HF names (loadable by transformers and load_model).
    Weights kept in GGUF blocks are written as blocks and listed in config.json's quantization_config
    (load_model reads them back as they were; transformers cannot). Each file is written to a temporary
    name and renamed, so a crash never leaves a partial file."""
    from safetensors.torch import save_file

    path = Path(path)
    c = model.config
    hf = c.to_hf()
    hf["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    tensors, block_types = _hf_tensors(model)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    if block_types:
        # Weights kept in GGUF blocks are written as their blocks (uint8 rows) and listed here, so that
        # load_model reads them back as blocks, not re-quantized; transformers cannot load these.
        hf["quantization_config"] = {"quant_method": BLOCKS_QUANT_METHOD, "blocks": block_types}
    path.mkdir(parents=True, exist_ok=True)
    for name, write in (
        ("model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"})),
        ("config.json", lambda p: Path(p).write_text(json.dumps(hf, indent=2) + "\n")),
    ):
        tmp = path / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, path / name)
    return path
