"""transformers' tensor names for the encoder-decoder models (BART, mBART, Marian, T5), both ways.

Our Seq2SeqTransformer fuses q/k/v into attn.qkv, the cross-attention's k/v into cross.kv and T5's gated
wi_0/wi_1 into mlp.up; the map below is the one place that knows both naming schemes. BART-family
checkpoints put the trunk under "model."; T5's names have no prefix. lm_head.weight and final_logits_bias
sit at the top level in both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from plm_engine.models.config import ModelConfig

if TYPE_CHECKING:
    from plm_engine.models.seq2seq import Seq2SeqTransformer

_TOP_LEVEL = ("lm_head.", "final_logits_bias")


def _bart_map(c: ModelConfig) -> list[tuple[str, list[str], str]]:
    m: list[tuple[str, list[str], str]] = []
    add = lambda ours, hf, mode="copy": m.append((ours, hf if isinstance(hf, list) else [hf], mode))
    linear = ("weight", "bias")[: 1 + c.qkv_bias]
    norm = ("weight", "bias")
    if c.share_embeddings:
        add("embed.weight", ["shared.weight", "encoder.embed_tokens.weight"], "first")
    else:
        add("embed.weight", "encoder.embed_tokens.weight")
        add("dec_embed.weight", "decoder.embed_tokens.weight")
    for side in ("encoder", "decoder"):
        short = side[:3]
        if c.positions == "learned":
            add(f"{short}_pos.weight", f"{side}.embed_positions.weight")
        if c.embed_norm:
            for s in norm:
                add(f"{short}_embed_norm.{s}", f"{side}.layernorm_embedding.{s}")
        if c.pre_norm:
            for s in norm:
                add(f"{short}_final_norm.{s}", f"{side}.layer_norm.{s}")
        for i in range(c.n_layers if side == "encoder" else c.n_decoder_layers):
            p, h = f"{side}.{i}.", f"{side}.layers.{i}."
            attns = [("attn", "self_attn")] + ([("cross", "encoder_attn")] if side == "decoder" else [])
            for ours, theirs in attns:
                for s in linear:
                    if ours == "attn":
                        add(p + f"attn.qkv.{s}", [h + f"self_attn.{x}_proj.{s}" for x in "qkv"], "cat")
                    else:
                        add(p + f"cross.q.{s}", h + f"encoder_attn.q_proj.{s}")
                        add(p + f"cross.kv.{s}", [h + f"encoder_attn.{x}_proj.{s}" for x in "kv"], "cat")
                    add(p + f"{ours}.out.{s}", h + f"{theirs}.out_proj.{s}")
                for s in norm:
                    add(p + f"{ours}_norm.{s}", h + f"{theirs}_layer_norm.{s}")
            for s in linear:
                add(p + f"mlp.up.{s}", h + f"fc1.{s}")
                add(p + f"mlp.down.{s}", h + f"fc2.{s}")
            for s in norm:
                add(p + f"mlp_norm.{s}", h + f"final_layer_norm.{s}")
    return m


def _t5_map(c: ModelConfig) -> list[tuple[str, list[str], str]]:
    m: list[tuple[str, list[str], str]] = []
    add = lambda ours, hf, mode="copy": m.append((ours, hf if isinstance(hf, list) else [hf], mode))
    add("embed.weight", ["shared.weight", "encoder.embed_tokens.weight"], "first")
    gated = c.activation in ("geglu", "swiglu")
    for side in ("encoder", "decoder"):
        short = side[:3]
        add(f"{short}_rel_bias", f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        add(f"{short}_final_norm.weight", f"{side}.final_layer_norm.weight")
        for i in range(c.n_layers if side == "encoder" else c.n_decoder_layers):
            p, h = f"{side}.{i}.", f"{side}.block.{i}.layer."
            add(p + "attn_norm.weight", h + "0.layer_norm.weight")
            add(p + "attn.qkv.weight", [h + f"0.SelfAttention.{x}.weight" for x in "qkv"], "cat")
            add(p + "attn.out.weight", h + "0.SelfAttention.o.weight")
            ff = 1
            if side == "decoder":
                ff = 2
                add(p + "cross_norm.weight", h + "1.layer_norm.weight")
                add(p + "cross.q.weight", h + "1.EncDecAttention.q.weight")
                add(p + "cross.kv.weight", [h + f"1.EncDecAttention.{x}.weight" for x in "kv"], "cat")
                add(p + "cross.out.weight", h + "1.EncDecAttention.o.weight")
            add(p + "mlp_norm.weight", h + f"{ff}.layer_norm.weight")
            dense = h + f"{ff}.DenseReluDense."
            add(
                p + "mlp.up.weight",
                [dense + "wi_0.weight", dense + "wi_1.weight"] if gated else dense + "wi.weight",
                "cat",
            )
            add(p + "mlp.down.weight", dense + "wo.weight")
    return m


def param_map(c: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(our name, HF names without the "model." prefix, how to combine: "copy" | "cat" | "first" (the
    first of the names the checkpoint has) | "row" (HF's (1, n) as (n,))) per tensor."""
    m = _t5_map(c) if c.arch == "t5" else _bart_map(c)
    if not c.tie_word_embeddings:
        m.append(("lm_head.weight", ["lm_head.weight"], "copy"))
    if c.final_logits_bias:
        m.append(("final_logits_bias", ["final_logits_bias"], "row"))
    return m


def _prefix(c: ModelConfig) -> str:
    return "" if c.arch == "t5" else "model."


def strip_prefix(name: str) -> str:
    """An HF tensor name without BART's "model." trunk prefix (T5's names have none)."""
    return name[len("model.") :] if name.startswith("model.") else name


def tie_from_tensors(config: ModelConfig, tensors, names: dict[str, str]) -> ModelConfig:
    """config with tie_word_embeddings as the checkpoint's tensors say (names: stripped -> HF name).
    As transformers 5 loads them: a head that is absent, or equal to the target embedding, is tied."""
    if config.tie_word_embeddings and "lm_head.weight" not in names:
        return config
    embed = "decoder.embed_tokens.weight" if not config.share_embeddings else "shared.weight"
    embed = embed if embed in names else "encoder.embed_tokens.weight"
    head = tensors[names["lm_head.weight"]] if "lm_head.weight" in names else None
    tied = head is None or (embed in names and torch.equal(head, tensors[names[embed]]))
    return config.replace(tie_word_embeddings=tied)


def hf_state_dict(model: Seq2SeqTransformer) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names (q/k/v, cross k/v and gated wi_0/wi_1 split)."""
    c = model.config
    ours = model.state_dict()
    prefix = _prefix(c)
    out = {}
    for name, hf_names, mode in param_map(c):
        t = ours[name].detach()
        if mode == "first":
            hf_names = hf_names[:1]
        if mode == "cat":
            sizes = [t.shape[0] // len(hf_names)] * len(hf_names)
            parts = list(t.split(sizes, 0))
        else:
            parts = [t.reshape(1, -1) if mode == "row" else t]
        for n, p in zip(hf_names, parts, strict=True):
            out[("" if n.startswith(_TOP_LEVEL) else prefix) + n] = p.contiguous()
    if c.arch == "bart" and not c.share_embeddings and c.extra.get("model_type", "bart") != "marian":
        # BART/mBART without tying still own a `shared` embedding (unused by the forward): keep the
        # checkpoint complete for transformers.
        out[prefix + "shared.weight"] = ours["embed.weight"].detach().contiguous()
    return out
