"""One thin transformer for GPT-2, BERT and Llama-family checkpoints, on plm_engine.ops.

    model = Transformer(ModelConfig.preset("llama-tiny"))
    out = model(input_ids, attention_mask=mask, labels=input_ids)   # loss through fused linear + CE
    out.loss.backward()

Padding never reaches attention: a batch with an attention_mask is packed into its real tokens
(attention_varlen over cu_seqlens) and the outputs are scattered back to (batch, seqlen, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plm_engine import ops
from plm_engine.layers.attention import Attention, AttentionContext
from plm_engine.layers.kv_cache import KVCache
from plm_engine.layers.linear import Linear, QuantEmbedding, QuantLinear
from plm_engine.layers.mlp import MLP
from plm_engine.layers.norm import LayerNorm, RMSNorm
from plm_engine.models.base import PretrainedModel
from plm_engine.models.config import ModelConfig
from plm_engine.ops import checks


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None  # (batch, seqlen, vocab) LM / MLM, or (batch, num_labels)
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (batch, seqlen, hidden) final hidden states (zeros at padding)


@dataclass
class _Tokens:
    """A batch as the trunk sees it: dense (batch, seqlen) or packed (total,) with cu_seqlens."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    token_type_ids: torch.Tensor | None
    index: torch.Tensor | None = None  # packed: flat (batch * seqlen) index of each real token
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


@dataclass
class PaddingLayout:
    """Where the real tokens of a padded batch are: what the model needs to pack it. Computing it reads the
    mask's values, so the trainer computes it on the host (from_mask on the CPU mask) with the batch and
    passes it in: the training step then reads nothing back (plm_engine/ops/checks.py)."""

    index: torch.Tensor  # flat (batch * seqlen) index of each real token, int64
    cu_seqlens: torch.Tensor  # (batch + 1,) int32 offsets of each sequence's real tokens
    max_seqlen: int

    @staticmethod
    def from_mask(attention_mask: torch.Tensor) -> PaddingLayout | None:
        """The layout of a (batch, seqlen) 0/1 mask, or None when nothing is padded."""
        mask = attention_mask.bool()
        if bool(mask.all()):
            return None
        lens = mask.sum(1, dtype=torch.int32)
        return PaddingLayout(
            mask.flatten().nonzero().squeeze(1), F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)), int(lens.max())
        )

    def to(self, device) -> PaddingLayout:
        return PaddingLayout(self.index.to(device), self.cu_seqlens.to(device), self.max_seqlen)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        norm = (
            (lambda: RMSNorm(c.hidden_size, c.norm_eps))
            if c.arch == "llama"
            else (lambda: LayerNorm(c.hidden_size, c.norm_eps))
        )
        self.post_norm = c.arch == "bert"
        self.dropout = c.dropout
        self.attn_norm = norm()
        self.attn = Attention(
            c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.qkv_bias, c.out_bias, rotary=c.arch == "llama"
        )
        self.mlp_norm = norm()
        self.mlp = MLP(c.hidden_size, c.intermediate_size, c.activation, c.mlp_bias)

    def forward(self, x, residual, ctx: AttentionContext, layer: int):
        """Pre-norm: x is the previous sublayer's output and residual the stream (None before the first
        layer); returns (this block's MLP output, the stream). Post-norm (BERT): x is the normalized
        stream; returns (the new one, None)."""
        drop = lambda t: F.dropout(t, self.dropout, self.training) if self.dropout else t
        if self.post_norm:
            x = self.attn_norm(drop(self.attn(x, ctx, layer)), residual=x)[0]
            return self.mlp_norm(drop(self.mlp(x)), residual=x)[0], None
        if residual is None:
            n, residual = self.attn_norm(x), x
        else:
            n, residual = self.attn_norm(x, residual=residual)
        n, residual = self.mlp_norm(drop(self.attn(n, ctx, layer)), residual=residual)
        return drop(self.mlp(n)), residual


class Transformer(PretrainedModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        self.tok_embed = nn.Embedding(c.vocab_size, d)
        self.pos_embed = nn.Embedding(c.max_position_embeddings, d) if c.arch != "llama" else None
        self.type_embed = nn.Embedding(c.type_vocab_size, d) if c.arch == "bert" and c.type_vocab_size else None
        self.embed_norm = LayerNorm(d, c.norm_eps) if c.arch == "bert" else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.final_norm = (
            None if c.arch == "bert" else (RMSNorm(d, c.norm_eps) if c.arch == "llama" else LayerNorm(d, c.norm_eps))
        )
        is_lm = c.arch != "bert" or c.mlm_head
        self.lm_head = Linear(d, c.vocab_size, bias=False) if is_lm and not c.tie_word_embeddings else None
        if c.arch == "bert":
            self.pooler = Linear(d, d) if c.pooler else None
            # MLM head: dense + GELU + LayerNorm, then the (tied) decoder with its own bias.
            self.mlm_dense = Linear(d, d) if c.mlm_head else None
            self.mlm_norm = LayerNorm(d, c.norm_eps) if c.mlm_head else None
            self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size)) if c.mlm_head else None
        self.classifier = Linear(d, c.num_labels, bias=c.arch == "bert") if c.num_labels else None
        self._rope_cache: dict = {}
        self.reset_parameters()

    # ---- parameters -------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(vocab, hidden): the LM head, which is the token embedding when tied."""
        return self.tok_embed.weight if self.lm_head is None else self.lm_head.weight

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin (max_positions, head_dim / 2), built once per device (not a buffer, so model.to(dtype)
        never rounds them)."""
        key = str(device)
        if key not in self._rope_cache:
            c = self.config
            self._rope_cache[key] = ops.rope_cos_sin(
                c.max_position_embeddings, c.head_dim, c.rope_theta, c.rope_scaling, device=device
            )
        return self._rope_cache[key]

    # ---- the trunk ----------------------------------------------------------------------------------

    def _trunk(self, t: _Tokens, ctx: AttentionContext) -> torch.Tensor:
        """Final hidden states of the tokens in t ((batch, seqlen, d) dense or (total, d) packed)."""
        x = self.tok_embed(t.input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(t.positions)
        if self.type_embed is not None:
            types = t.token_type_ids if t.token_type_ids is not None else torch.zeros_like(t.input_ids)
            x = x + self.type_embed(types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, True)
        residual = None
        for i, block in enumerate(self.layers):
            x, residual = block(x, residual, ctx, i)
        if self.final_norm is not None:
            x = self.final_norm(x, residual=residual)[0]
        return x

    def _context(self, t: _Tokens, device) -> AttentionContext:
        cos, sin = self.rope_tables(device) if self.config.arch == "llama" else (None, None)
        return AttentionContext(
            causal=self.config.causal,
            cu_seqlens=t.cu_seqlens,
            max_seqlen=t.max_seqlen,
            positions=t.positions,
            cos=cos,
            sin=sin,
        )

    def _check_input(self, input_ids, attention_mask, token_type_ids, position_ids):
        c = self.config
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError(
                f"input_ids must be an integer tensor (batch, seqlen), got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                f"{tuple(getattr(input_ids, 'shape', ()))}"
            )
        b, s = input_ids.shape
        if s > c.max_position_embeddings and position_ids is None:
            raise ValueError(f"sequence length {s} exceeds the model's context of {c.max_position_embeddings} tokens")
        for name, t in (
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
            ("position_ids", position_ids),
        ):
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"{name} must have the shape of input_ids {(b, s)}, got {tuple(t.shape)}")
        if checks.value_checks():  # values: where data enters, not inside the engine or the trainer
            self._check_values(input_ids, position_ids, token_type_ids)

    def _check_values(self, input_ids, position_ids=None, token_type_ids=None):
        c = self.config
        if input_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for a vocabulary of {c.vocab_size}")
        if position_ids is not None and position_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(position_ids))
            if lo < 0 or hi >= c.max_position_embeddings:
                raise ValueError(
                    f"position {lo if lo < 0 else hi} is outside the model's context of "
                    f"{c.max_position_embeddings} tokens"
                )
        if (
            token_type_ids is not None
            and token_type_ids.numel()
            and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= max(c.type_vocab_size, 1))
        ):
            raise ValueError(f"token_type_ids must lie in [0, {max(c.type_vocab_size, 1)})")

    def _tokens(self, input_ids, attention_mask, token_type_ids, position_ids, layout=None) -> _Tokens:
        self._check_input(input_ids, attention_mask, token_type_ids, position_ids)
        b, s = input_ids.shape
        input_ids = input_ids.long()
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if layout is None and attention_mask is not None:
            layout = PaddingLayout.from_mask(attention_mask)  # reads the mask: pass `layout` in the hot path
        if layout is None:
            return _Tokens(input_ids, position_ids, token_type_ids)
        # Pack the real tokens: attention sees sequences, never padding.
        pick = lambda t: None if t is None else t.flatten()[layout.index]
        return _Tokens(
            pick(input_ids),
            pick(position_ids),
            pick(token_type_ids),
            layout.index,
            layout.cu_seqlens,
            layout.max_seqlen,
        )

    def _unpack(self, t: _Tokens, values: torch.Tensor, shape) -> torch.Tensor:
        """Packed (total, ...) rows back to (batch, seqlen, ...), zeros at padding."""
        if t.index is None:
            return values.reshape(*shape, values.shape[-1])
        out = values.new_zeros(shape[0] * shape[1], *values.shape[1:])
        out[t.index] = values
        return out.view(*shape, *values.shape[1:])

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, layout=None):
        """(batch, seqlen, hidden) final hidden states (after the final norm; zeros at padding). layout: the
        PaddingLayout of attention_mask, when the caller has it (no read of the mask then)."""
        t = self._tokens(input_ids, attention_mask, token_type_ids, position_ids, layout)
        with checks.trusted():  # checked above: the ops inside read no values
            return self._unpack(t, self._trunk(t, self._context(t, input_ids.device)), input_ids.shape)

    # ---- heads ----------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        return_logits=None,
        layout=None,
        label_index=None,
    ) -> ModelOutput:
        """Causal models: next-token logits (batch, seqlen, vocab); labels like input_ids (shifted here;
        -100 and padding ignored) give the loss through the fused linear + cross-entropy, and then no
        logits unless return_logits. BERT: MLM logits/loss (labels -100 where not masked), or only
        hidden_states when the checkpoint has no MLM head.
        layout: attention_mask's PaddingLayout; label_index: for MLM on an unpadded batch, the flat
        (batch * seqlen) positions whose label is not -100. The trainer computes both on the host, so
        that the training step reads no device value."""
        c = self.config
        t = self._tokens(input_ids, attention_mask, token_type_ids, position_ids, layout)
        if labels is not None and isinstance(labels, torch.Tensor) and labels.numel() and checks.value_checks():
            if bool((((labels < 0) & (labels != -100)) | (labels >= c.vocab_size)).any()):
                raise ValueError(f"labels must be token ids in [0, {c.vocab_size}) or -100 (ignored)")
        with checks.trusted():  # checked above: the ops inside read no values
            h = self._trunk(t, self._context(t, input_ids.device))
            shape = input_ids.shape
            hidden = self._unpack(t, h, shape)
            if c.arch == "bert" and not c.mlm_head:
                if labels is not None:
                    raise ValueError("this BERT checkpoint has no MLM head: use classify() or hidden states")
                return ModelOutput(hidden_states=hidden)
            want_logits = labels is None if return_logits is None else return_logits
            loss = None
            if labels is not None:
                if tuple(labels.shape) != tuple(shape):
                    raise ValueError(
                        f"labels must have the shape of input_ids {tuple(shape)}, got {tuple(labels.shape)}"
                    )
                labels = labels.long()
                if c.causal:
                    labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # token t predicts token t + 1
                target = labels.flatten() if t.index is None else labels.flatten()[t.index]
                flat = h.reshape(-1, h.shape[-1])
                w = self.lm_head_weight
                if c.causal:
                    loss = ops.linear_cross_entropy(flat.to(w.dtype), w, target)
                else:  # MLM: only the masked positions go through the head
                    if label_index is not None and t.index is None:
                        sel = label_index
                    else:  # a read of the labels: the trainer passes label_index instead
                        sel = (target != -100).nonzero().squeeze(1)
                    loss = ops.linear_cross_entropy(
                        self._mlm_transform(flat[sel]).to(w.dtype), w, target[sel], bias=self.mlm_bias
                    )
            logits = None
            if want_logits:
                logits = self._unpack(t, self._lm_logits(h.reshape(-1, h.shape[-1])), shape)
            return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)

    def _mlm_transform(self, h):
        return self.mlm_norm(
            ops.gelu(self.mlm_dense(h), approximate="tanh" if self.config.activation == "gelu_tanh" else "none")
        )

    def _lm_logits(self, h):
        if self.config.arch == "bert":
            return ops.linear(self._mlm_transform(h), self.lm_head_weight, self.mlm_bias)
        head = self.tok_embed if self.lm_head is None else self.lm_head
        if isinstance(head, QuantEmbedding):  # a tied head kept in GGUF blocks
            return head.logits(h)
        if isinstance(head, QuantLinear):
            return head(h)
        return ops.linear(h, self.lm_head_weight)

    def classify(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, layout=None) -> ModelOutput:
        """Sequence classification: logits (batch, num_labels), loss with labels (batch,); the head reads
        pool() of the final hidden states."""
        if self.classifier is None:
            raise ValueError("classify() needs a model built with config.num_labels > 0")
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, layout=layout)
        pooled = self.pool(hidden, attention_mask)
        if self.config.arch == "bert" and self.config.dropout and self.training:
            pooled = F.dropout(pooled, self.config.dropout, True)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if labels.shape != (input_ids.shape[0],):
                raise ValueError(f"classify: labels must be ({input_ids.shape[0]},), got {tuple(labels.shape)}")
            loss = ops.cross_entropy(logits.float(), labels.long())
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, hidden) the features classify() reads from the final hidden states: their mean over the
        real tokens with config.classifier_pooling="mean"; else BERT pools the first token (pooler + tanh)
        and causal models read the last real token."""
        if self.config.classifier_pooling == "mean":
            return _mean_over_tokens(hidden, attention_mask)
        if self.config.arch == "bert":
            pooled = hidden[:, 0]
            return torch.tanh(self.pooler(pooled)) if self.pooler is not None else pooled
        b, s = hidden.shape[:2]
        mask = torch.ones((b, s), dtype=torch.long, device=hidden.device) if attention_mask is None else attention_mask
        last = s - 1 - mask.flip(1).int().argmax(1)  # the rightmost real token
        return hidden[torch.arange(b, device=hidden.device), last]

    def embed(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(batch, hidden) mean of the final hidden states over the real tokens (sentence embeddings)."""
        return _mean_over_tokens(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask)

    # ---- generation over a paged KV cache -----------------------------------------------------------

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16, dtype=None, device=None) -> KVCache:
        c = self.config
        e = self.tok_embed  # its dtype is the model's (compute) dtype, quantized or not
        e_dtype, e_device = (
            (e.dtype, e.qweight.device) if isinstance(e, QuantEmbedding) else (e.weight.dtype, e.weight.device)
        )
        return KVCache.allocate(
            c.n_layers, num_blocks, block_size, c.n_kv_heads, c.head_dim, dtype or e_dtype, device or e_device
        )

    # forward_tokens (models/base.py) checks a direct call's values, then runs this trusted.
    def _check_step_values(self, input_ids, positions):
        self._check_values(input_ids, positions)

    def _forward_tokens(self, input_ids, positions, kv_cache, batch, logits_index):
        ctx = AttentionContext.paged_step(batch, positions, kv_cache)
        if self.config.arch == "llama":
            ctx.cos, ctx.sin = self.rope_tables(input_ids.device)
        t = _Tokens(input_ids, positions, None)
        h = self._trunk(t, ctx)
        if logits_index is None:
            logits_index = batch.cu_seqlens[1:].long() - 1
        return self._lm_logits(h[logits_index])


def _mean_over_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, hidden) mean of (batch, seq, hidden) over the positions the mask marks real."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
