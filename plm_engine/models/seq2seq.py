"""One encoder-decoder transformer for BART, mBART, Marian and T5 checkpoints, on plm_engine.ops.

    model = Seq2SeqTransformer(ModelConfig.preset("bart-tiny"))
    out = model(input_ids, attention_mask=mask, labels=labels)   # decoder input: labels shifted right
    out.loss.backward()

Both sides always run packed: a batch is flattened to its real tokens with cu_seqlens, so padding never
reaches attention. The encoder attends bidirectionally over its tokens; the decoder attends causally over
its own and, in every layer, over its source's encoder output (attention_varlen with the decoder's and the
source's cu_seqlens: different query and key lengths, no mask). T5's relative position bias is computed
inside the attention kernels from its bucket table (ops.RelativePositionBias), never materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plm_engine import ops
from plm_engine.layers.attention import Attention, AttentionContext, CrossAttention, CrossKV
from plm_engine.layers.kv_cache import KVCache
from plm_engine.layers.linear import Linear
from plm_engine.layers.mlp import MLP
from plm_engine.layers.norm import LayerNorm, RMSNorm
from plm_engine.models.base import PretrainedModel
from plm_engine.models.config import ModelConfig
from plm_engine.models.transformer import ModelOutput, PaddingLayout
from plm_engine.ops import checks

POSITION_OFFSET = 2  # BART's learned position tables start at row 2 (a fairseq legacy)


@dataclass
class _Packed:
    """One side of a batch as the stacks see it: its real tokens packed, sequence i at cu_seqlens[i]:[i+1]."""

    ids: torch.Tensor  # (total,) int64
    positions: torch.Tensor  # (total,) int64, the column of each token in the (batch, seqlen) input
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    max_seqlen: int
    index: torch.Tensor | None  # flat (batch * seqlen) index of each real token; None: nothing padded


def _pack(ids: torch.Tensor, mask: torch.Tensor | None, layout: PaddingLayout | None) -> _Packed:
    b, s = ids.shape
    if layout is None and mask is not None:
        layout = PaddingLayout.from_mask(mask)  # reads the mask: the trainer passes `layout` instead
    positions = torch.arange(s, device=ids.device).expand(b, s)
    if layout is None:
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=ids.device)
        return _Packed(ids.reshape(-1).long(), positions.reshape(-1), cu, s, None)
    idx = layout.index
    return _Packed(ids.flatten()[idx].long(), positions.flatten()[idx], layout.cu_seqlens, layout.max_seqlen, idx)


def _unpack(p: _Packed, values: torch.Tensor, shape) -> torch.Tensor:
    """Packed (total, ...) rows back to (batch, seqlen, ...), zeros at padding."""
    if p.index is None:
        return values.reshape(*shape, *values.shape[1:])
    out = values.new_zeros(shape[0] * shape[1], *values.shape[1:])
    out[p.index] = values
    return out.view(*shape, *values.shape[1:])


def sinusoidal_positions(n_positions: int, dim: int, device=None) -> torch.Tensor:
    """Marian's (fairseq's) table: sin of pos / 10000^(2i/dim) in the first half, cos in the second."""
    pos = torch.arange(n_positions, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64, device=device)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    half = (dim + 1) // 2
    out = torch.empty(n_positions, dim, dtype=torch.float64, device=device)
    out[:, :half] = torch.sin(angle[:, 0::2])
    out[:, half:] = torch.cos(angle[:, 1::2])
    return out.float()


class _Sublayers(nn.Module):
    """The residual plumbing shared by the encoder and decoder blocks.

    Pre-norm (T5, mBART): each sublayer reads norm(stream) and its output is added to the stream; the add
    is fused into the next norm (ops.layer_norm / rms_norm with residual=), so a block takes and returns
    (last sublayer output, stream). Post-norm (BART, Marian): the stream is norm(x + sublayer(x)) and the
    block returns (stream, None)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.pre_norm, self.dropout = c.pre_norm, c.dropout

    def _drop(self, t):
        return F.dropout(t, self.dropout, self.training) if self.dropout else t

    def _run(self, sublayers, x, residual):
        for norm, fn in sublayers:
            if self.pre_norm:
                n, residual = (norm(x), x) if residual is None else norm(x, residual=residual)
                x = self._drop(fn(n))
            else:
                x = norm(self._drop(fn(x)), residual=x)[0]
        return x, residual


def _norm(c: ModelConfig):
    return RMSNorm(c.hidden_size, c.norm_eps) if c.arch == "t5" else LayerNorm(c.hidden_size, c.norm_eps)


def _self_attention(c: ModelConfig) -> Attention:
    bias = c.qkv_bias
    scale = 1.0 if c.arch == "t5" else None  # T5 folds 1/sqrt(head_dim) into its weights
    return Attention(c.hidden_size, c.n_heads, c.n_heads, c.head_dim, bias, c.out_bias, False, softmax_scale=scale)


class EncoderBlock(_Sublayers):
    def __init__(self, c: ModelConfig):
        super().__init__(c)
        self.attn_norm, self.attn = _norm(c), _self_attention(c)
        self.mlp_norm, self.mlp = _norm(c), MLP(c.hidden_size, c.intermediate_size, c.activation, c.mlp_bias)

    def forward(self, x, residual, ctx: AttentionContext):
        return self._run(((self.attn_norm, lambda h: self.attn(h, ctx, 0)), (self.mlp_norm, self.mlp)), x, residual)


class DecoderBlock(_Sublayers):
    def __init__(self, c: ModelConfig):
        super().__init__(c)
        self.attn_norm, self.attn = _norm(c), _self_attention(c)
        scale = 1.0 if c.arch == "t5" else None
        self.cross_norm = _norm(c)
        self.cross = CrossAttention(c.hidden_size, c.n_heads, c.head_dim, c.qkv_bias, softmax_scale=scale)
        self.mlp_norm, self.mlp = _norm(c), MLP(c.hidden_size, c.intermediate_size, c.activation, c.mlp_bias)

    def forward(self, x, residual, ctx: AttentionContext, layer: int):
        """ctx: the decoder tokens' layout (packed or paged) and ctx.cross, the encoder side."""
        cross = lambda h: self.cross(h, ctx.cu_seqlens, ctx.max_seqlen, ctx.cross, layer)
        return self._run(
            (
                (self.attn_norm, lambda h: self.attn(h, ctx, layer)),
                (self.cross_norm, cross),
                (self.mlp_norm, self.mlp),
            ),
            x,
            residual,
        )


class Seq2SeqTransformer(PretrainedModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.is_encoder_decoder:
            raise ValueError(f"Seq2SeqTransformer needs an encoder-decoder config (bart, t5), got {config.arch!r}")
        c = self.config = config
        d = c.hidden_size
        # The source's (and, when shared, the target's) tokens. The BART family never trains its padding
        # row (padding_idx), as transformers; T5 has no such row.
        pad = lambda n: (
            c.pad_token_id if c.arch == "bart" and c.pad_token_id is not None and c.pad_token_id < n else None
        )
        self.embed = nn.Embedding(c.vocab_size, d, padding_idx=pad(c.vocab_size))
        v = c.decoder_vocab_size
        self.dec_embed = None if c.share_embeddings else nn.Embedding(v, d, padding_idx=pad(v))
        learned = c.positions == "learned"
        self.enc_pos = nn.Embedding(c.max_position_embeddings + POSITION_OFFSET, d) if learned else None
        self.dec_pos = nn.Embedding(c.max_position_embeddings + POSITION_OFFSET, d) if learned else None
        self.enc_embed_norm = _norm(c) if c.embed_norm else None
        self.dec_embed_norm = _norm(c) if c.embed_norm else None
        relative = c.positions == "relative"
        # T5: one (buckets, heads) table per stack, shared by all its layers.
        self.enc_rel_bias = nn.Parameter(torch.empty(c.relative_attention_num_buckets, c.n_heads)) if relative else None
        self.dec_rel_bias = nn.Parameter(torch.empty(c.relative_attention_num_buckets, c.n_heads)) if relative else None
        self.encoder = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_layers))
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_decoder_layers))
        self.enc_final_norm = _norm(c) if c.pre_norm else None
        self.dec_final_norm = _norm(c) if c.pre_norm else None
        self.lm_head = None if c.tie_word_embeddings else Linear(d, c.decoder_vocab_size, bias=False)
        if c.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(c.decoder_vocab_size))
        else:
            self.final_logits_bias = None
        self._sinusoid_cache: dict = {}
        self.reset_parameters()

    # ---- parameters -------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Init for training from scratch: GPT-2's N(0, 0.02), residual output projections scaled by
        1/sqrt(2 * layers), zero biases, unit norms; but the query/key/value projections get
        N(0, 1/hidden) (as T5's keys and values), so that attention is not uniform at the start: a small
        model then finds the source-target alignment (cross-attention copying) in far fewer steps."""
        std, n = 0.02, self.config.n_layers + self.config.n_decoder_layers
        qkv_std = self.config.hidden_size**-0.5
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("bias") and not name.endswith("rel_bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "cross.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * n))
            elif name.endswith(("attn.qkv.weight", "cross.q.weight", "cross.kv.weight")):
                nn.init.normal_(p, 0.0, qkv_std)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block, encoder then decoder (FSDP wraps and activation checkpointing)."""
        return [*self.encoder, *self.decoder]

    @property
    def target_embed(self) -> nn.Embedding:
        return self.embed if self.dec_embed is None else self.dec_embed

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(target vocab, hidden): the LM head, which is the decoder's token embedding when tied."""
        return self.target_embed.weight if self.lm_head is None else self.lm_head.weight

    def sinusoids(self, device) -> torch.Tensor:
        """fp32 (max_positions, hidden) table, built once per device (not a buffer: never rounded by .to())."""
        key = str(device)
        if key not in self._sinusoid_cache:
            c = self.config
            self._sinusoid_cache[key] = sinusoidal_positions(c.max_position_embeddings, c.hidden_size, device)
        return self._sinusoid_cache[key]

    def _bias(self, decoder: bool) -> ops.RelativePositionBias | None:
        table = self.dec_rel_bias if decoder else self.enc_rel_bias
        if table is None:
            return None
        return ops.RelativePositionBias(table, not decoder, self.config.relative_attention_max_distance)

    # ---- the stacks ---------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor, decoder: bool) -> torch.Tensor:
        c = self.config
        x = (self.target_embed if decoder else self.embed)(ids)
        if c.scale_embedding:
            x = x * math.sqrt(c.hidden_size)
        if c.positions == "learned":
            x = x + (self.dec_pos if decoder else self.enc_pos)(positions + POSITION_OFFSET)
        elif c.positions == "sinusoidal":
            x = x + self.sinusoids(ids.device)[positions].to(x.dtype)
        norm = self.dec_embed_norm if decoder else self.enc_embed_norm
        if norm is not None:
            x = norm(x)
        return F.dropout(x, c.dropout, True) if c.dropout and self.training else x

    def _finish(self, x, residual, norm):
        if norm is None:  # post-norm: x is the normalised stream
            return x
        h = norm(x, residual=residual)[0]
        return F.dropout(h, self.config.dropout, True) if self.config.dropout and self.training else h

    def encode(self, ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, positions=None) -> torch.Tensor:
        """The encoder's final hidden states (total, hidden) of packed source tokens ids (total,)."""
        if positions is None:
            positions = _positions_from_cu(cu_seqlens, ids.shape[0])
        ctx = AttentionContext(
            causal=False, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_bias=self._bias(decoder=False)
        )
        x, residual = self._embed(ids, positions, decoder=False), None
        for block in self.encoder:
            x, residual = block(x, residual, ctx)
        return self._finish(x, residual, self.enc_final_norm)

    def cross_kv(self, enc: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> CrossKV:
        """Every decoder layer's keys and values of the encoder output enc (total_src, hidden), computed
        now: for decoding many steps against one source (generation)."""
        kv = [block.cross.project_kv(enc) for block in self.decoder]
        return CrossKV(cu_seqlens, max_seqlen, k=[k for k, _ in kv], v=[v for _, v in kv])

    def _decode(self, ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x, residual = self._embed(ids, positions, decoder=True), None
        for i, block in enumerate(self.decoder):
            x, residual = block(x, residual, ctx, i)
        return self._finish(x, residual, self.dec_final_norm)

    def _head_input(self, h: torch.Tensor) -> torch.Tensor:
        # T5 with a tied head rescales the decoder output (its embeddings are N(0, 1), not N(0, 1/d)).
        return h * self.config.hidden_size**-0.5 if self.config.scale_decoder_outputs else h

    def _lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.lm_head_weight
        return ops.linear(self._head_input(h).to(w.dtype), w, self.final_logits_bias)

    # ---- training and scoring ----------------------------------------------------------------------

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """The decoder input that teacher-forces labels (batch, tgt_len): decoder_start_token_id, then the
        labels without their last token; -100 (ignored) becomes the pad token."""
        c = self.config
        if c.decoder_start_token_id is None:
            raise ValueError("this config has no decoder_start_token_id: pass decoder_input_ids")
        out = labels.new_empty(labels.shape)
        out[:, 0] = c.decoder_start_token_id
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill(out == -100, c.pad_token_id if c.pad_token_id is not None else 0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        layout: PaddingLayout | None = None,
        decoder_layout: PaddingLayout | None = None,
    ) -> ModelOutput:
        """Source input_ids (batch, src_len); target decoder_input_ids (batch, tgt_len), or labels whose
        right shift they are (as transformers does). Returns logits (batch, tgt_len, target vocab) where
        labels[:, t] is what position t predicts (no shift here), and with labels the mean loss over the
        labels that are not -100, through the fused linear + cross-entropy (then no logits unless
        return_logits). hidden_states: the decoder's final hidden states. Padding (zeros in the masks)
        is removed, never attended; layout / decoder_layout: the masks' PaddingLayouts, which the trainer
        computes on the host so that the training step reads no device value."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels (whose right shift they are)")
            decoder_input_ids = self.shift_right(labels)
        self._check_inputs(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels)
        with checks.trusted():  # checked above: the ops inside read no values
            src = _pack(input_ids, attention_mask, layout)
            tgt = _pack(decoder_input_ids, decoder_attention_mask, decoder_layout)
            enc = self.encode(src.ids, src.cu_seqlens, src.max_seqlen, src.positions)
            ctx = AttentionContext(
                causal=True,
                cu_seqlens=tgt.cu_seqlens,
                max_seqlen=tgt.max_seqlen,
                position_bias=self._bias(decoder=True),
                cross=CrossKV(src.cu_seqlens, src.max_seqlen, memory=enc),  # each layer projects its own k/v
            )
            h = self._decode(tgt.ids, tgt.positions, ctx)
            shape = decoder_input_ids.shape
            loss = None
            if labels is not None:
                target = labels.reshape(-1).long()
                target = target if tgt.index is None else target[tgt.index]
                w = self.lm_head_weight
                loss = ops.linear_cross_entropy(self._head_input(h).to(w.dtype), w, target, bias=self.final_logits_bias)
            want_logits = labels is None if return_logits is None else return_logits
            logits = _unpack(tgt, self._lm_logits(h), shape) if want_logits else None
            return ModelOutput(logits=logits, loss=loss, hidden_states=_unpack(tgt, h, shape))

    def _check_ids(self, name: str, ids, mask, vocab: int) -> None:
        c = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{name} must be an integer tensor (batch, seqlen), got "
                f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}"
            )
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"the mask of {name} must have its shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if c.positions != "relative" and ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"{name} has {ids.shape[1]} tokens; the model's context is {c.max_position_embeddings}")
        if checks.value_checks() and ids.numel():  # values: where data enters, not in the trainer's step
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{name}: token id {lo if lo < 0 else hi} is out of range for a vocabulary of {vocab}")

    def _check_inputs(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels) -> None:
        c = self.config
        self._check_ids("input_ids", input_ids, attention_mask, c.vocab_size)
        self._check_ids("decoder_input_ids", decoder_input_ids, decoder_attention_mask, c.decoder_vocab_size)
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} rows but decoder_input_ids {decoder_input_ids.shape[0]}"
            )
        if labels is not None:
            if tuple(labels.shape) != tuple(decoder_input_ids.shape):
                raise ValueError(
                    f"labels must have the shape of decoder_input_ids {tuple(decoder_input_ids.shape)}, got "
                    f"{tuple(labels.shape)}"
                )
            if labels.numel() and checks.value_checks():
                v = c.decoder_vocab_size
                if bool((((labels < 0) & (labels != -100)) | (labels >= v)).any()):
                    raise ValueError(f"labels must be token ids in [0, {v}) or -100 (ignored)")

    @torch.no_grad()
    def generate_greedy(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32
    ) -> list[list[int]]:
        """Greedy decoding without a KV cache (each step re-runs the decoder): a small helper for demos and
        checks. Returns each row's new tokens, up to and including the first end-of-sequence token. For
        serving, plm_engine.generation.Engine runs these models over its paged cache."""
        c = self.config
        self._check_ids("input_ids", input_ids, attention_mask, c.vocab_size)
        src = _pack(input_ids, attention_mask, None)
        with checks.trusted():
            cross = self.cross_kv(
                self.encode(src.ids, src.cu_seqlens, src.max_seqlen, src.positions), src.cu_seqlens, src.max_seqlen
            )
            b = input_ids.shape[0]
            dec = torch.full((b, 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
            eos = torch.tensor(c.eos_token_ids or [-1], device=input_ids.device)
            done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
            limit = max_new_tokens if c.positions == "relative" else min(max_new_tokens, c.max_position_embeddings - 1)
            for _ in range(limit):
                tgt = _pack(dec, None, None)
                ctx = AttentionContext(
                    causal=True,
                    cu_seqlens=tgt.cu_seqlens,
                    max_seqlen=tgt.max_seqlen,
                    position_bias=self._bias(decoder=True),
                    cross=cross,
                )
                h = self._decode(tgt.ids, tgt.positions, ctx).view(b, dec.shape[1], -1)[:, -1]
                nxt = self._lm_logits(h).argmax(-1)
                dec = torch.cat([dec, nxt.unsqueeze(1)], 1)
                done |= torch.isin(nxt, eos)
                if bool(done.all()):
                    break
        out = []
        for row in dec[:, 1:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in c.eos_token_ids), len(row))
            out.append(row[:cut])
        return out

    # ---- generation over a paged KV cache (plm_engine/generation/seq2seq.py) -------------------------

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16, dtype=None, device=None) -> KVCache:
        """The decoder's self-attention cache (the encoder's keys/values for cross-attention are a CrossKV)."""
        c = self.config
        p = self.embed.weight
        return KVCache.allocate(
            c.n_decoder_layers, num_blocks, block_size, c.n_heads, c.head_dim, dtype or p.dtype, device or p.device
        )

    # forward_tokens (models/base.py) checks a direct call's values, then runs this trusted; its
    # `cross` holds each sequence's encoder keys/values in batch order.
    def _check_step_values(self, input_ids, positions):
        if input_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.config.decoder_vocab_size:
                raise ValueError(f"forward_tokens: token id {lo if lo < 0 else hi} is out of range")

    def _forward_tokens(self, input_ids, positions, kv_cache, batch, logits_index, *, cross: CrossKV):
        """One decoder step over packed new target tokens; logits over the target vocabulary."""
        ctx = AttentionContext.paged_step(
            batch, positions, kv_cache, position_bias=self._bias(decoder=True), cross=cross
        )
        h = self._decode(input_ids, positions, ctx)
        if logits_index is None:
            logits_index = batch.cu_seqlens[1:].long() - 1
        return self._lm_logits(h[logits_index])


def _positions_from_cu(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each packed token's position in its sequence, from cu_seqlens, without a host read."""
    seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=cu_seqlens.device), right=True)
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seq]
