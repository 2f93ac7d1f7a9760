"""Pure-PyTorch references: the executable specification of every op.

They are the test oracle (run in fp64 or fp32), the `torch` backend, and the last-resort fallback.
Written for clarity, not speed: math in fp32 (or fp64 for fp64 inputs), cast to the input dtype at the
end, exactly as the fused kernels are specified to do.
"""

from __future__ import annotations

import torch

from plm_engine.ops.position_bias import RelativePositionBias, relative_position_bucket


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    # The sum is rounded to x's dtype before normalising: that rounded h is what the pre-norm block
    # carries on, so the norm must see the same value.
    return x if residual is None else x + residual


def layer_norm_ref(x, weight, bias=None, eps=1e-5, residual=None):
    """y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias over the last dim, h = x (+ residual).

    Returns y, or (y, h) when residual is given.
    """
    h = _add_residual(x, residual)
    acc = _acc_dtype(x)
    hf = h.to(acc)
    mean = hf.mean(dim=-1, keepdim=True)
    var = (hf - mean).square().mean(dim=-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    """y = h / sqrt(mean(h^2) + eps) * weight over the last dim, h = x (+ residual).

    Returns y, or (y, h) when residual is given.
    """
    h = _add_residual(x, residual)
    acc = _acc_dtype(x)
    hf = h.to(acc)
    y = hf * torch.rsqrt(hf.square().mean(dim=-1, keepdim=True) + eps) * weight.to(acc)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def softmax_ref(x, dim=-1, scale=1.0, causal=False):
    """softmax(scale * x) along `dim`, computed in fp32 (fp64 for fp64 input), cast to x's dtype.

    A row whose entries are all -inf gives zeros (PyTorch gives NaN). causal=True treats the last two
    dims as (query i, key j) scores and masks j > i + (sk - sq): the bottom-right-aligned causal mask of
    attention with a KV prefix; a row with every key masked gives zeros. causal requires dim = -1.
    """
    acc = _acc_dtype(x)
    xf = x.to(acc) * scale
    if causal:
        sq, sk = x.shape[-2], x.shape[-1]
        i = torch.arange(sq, device=x.device).unsqueeze(1)
        j = torch.arange(sk, device=x.device).unsqueeze(0)
        xf = xf.masked_fill(j > i + (sk - sq), float("-inf"))
    m = xf.amax(dim=dim, keepdim=True)
    # An all -inf row has max -inf; subtracting 0 instead keeps exp() at 0 rather than NaN.
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(xf - m)
    s = e.sum(dim=dim, keepdim=True)
    return (e / torch.where(s == 0, torch.ones_like(s), s)).to(x.dtype)


def cross_entropy_ref(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Cross-entropy of logits (..., V) against class indices target (...), math in fp32 (fp64 for fp64).

    Per token: loss = logsumexp(x) - (1 - eps) * x[target] - eps * mean(x), eps = label_smoothing (the
    same smoothing as F.cross_entropy). Tokens whose target is ignore_index get loss 0. reduction:
    "none" (per-token, target's shape), "sum", or "mean" over the non-ignored tokens; a batch with every
    token ignored gives mean 0 (PyTorch gives NaN). The result has logits' dtype, like F.cross_entropy.
    """
    acc = _acc_dtype(logits)
    v = logits.shape[-1]
    x = logits.reshape(-1, v).to(acc)
    t = target.reshape(-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    # Ignored rows take no part (zeros in, zero gradient out), so an all -inf ignored row cannot turn
    # into NaN through logsumexp's backward.
    x = torch.where(valid.unsqueeze(1), x, torch.zeros_like(x))
    # Shift by the row max first, so a large common offset cancels exactly before the subtraction
    # lse - x_t (unshifted, fp32 loses ~1e-3 at 1e4 offsets). The shift is a constant for autograd.
    m = x.detach().amax(dim=-1, keepdim=True)
    x = x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row stays -inf, not NaN
    x_t = x.gather(1, t_safe.unsqueeze(1)).squeeze(1)
    loss = torch.logsumexp(x, dim=-1) - (1.0 - label_smoothing) * x_t
    if label_smoothing != 0.0:
        # Only with smoothing: the mean is -inf for a row with a -inf logit, and 0 * -inf would be NaN.
        loss = loss - label_smoothing * x.mean(dim=-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape).to(logits.dtype)
    if reduction == "sum":
        return loss.sum().to(logits.dtype)
    return (loss.sum() / valid.sum().clamp(min=1)).to(logits.dtype)


def linear_cross_entropy_ref(
    hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"
):
    """cross_entropy_ref(hidden @ weight.T + bias, target): the LM head and its loss, unfused.

    hidden: (..., d), weight: (V, d), bias: (V,) or None, target: (...). The logits are rounded to
    hidden's dtype, as the matmul of a low-precision model produces them.
    """
    import torch.nn.functional as F

    return cross_entropy_ref(F.linear(hidden, weight, bias), target, ignore_index, label_smoothing, reduction)


def linear_ref(x, weight, bias=None):
    """x @ weight.T + bias (F.linear) with fp32 math (fp64 for fp64 inputs), cast to x's dtype.

    x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N).
    """
    acc = _acc_dtype(x)
    b = None if bias is None else bias.to(acc)
    return torch.nn.functional.linear(x.to(acc), weight.to(acc), b).to(x.dtype)


def rope_ref(q, k, cos, sin, interleaved=False, position_ids=None):
    """Rotary position embedding of q and k; returns (q_out, k_out) in their dtypes.

    q: (batch, seqlen, q_heads, head_dim) or packed (total_tokens, q_heads, head_dim); k: the same with
    its own head count. cos, sin: (max_seqlen, rotary_dim / 2), rotary_dim <= head_dim; the first
    rotary_dim features of every head are rotated, the rest pass through. position_ids: token positions,
    (seqlen,) or (batch, seqlen) for 4-D inputs (default arange(seqlen)), (total_tokens,) for packed.
    Pairs are (x[i], x[i + rotary_dim/2]) (GPT-NeoX / Llama rotate_half) or, interleaved,
    (x[2i], x[2i+1]) (GPT-J); each pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin).
    """
    half = cos.shape[-1]

    def rotate(x):
        acc = _acc_dtype(x)
        c = cos[: x.shape[-3]] if position_ids is None else cos[position_ids]
        s = sin[: x.shape[-3]] if position_ids is None else sin[position_ids]
        c, s = c.to(acc).unsqueeze(-2), s.to(acc).unsqueeze(-2)  # broadcast over heads
        xr = x[..., : 2 * half].to(acc)
        x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
        return torch.cat((out.to(x.dtype), x[..., 2 * half :]), dim=-1)

    return rotate(q), rotate(k)


def swiglu_ref(gate, up):
    """silu(gate) * up = gate * sigmoid(gate) * up, elementwise (same shapes), math in fp32."""
    import torch.nn.functional as F

    acc = _acc_dtype(gate)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def gelu_ref(x, approximate="none"):
    """GELU: x * Phi(x) with the exact normal CDF (erf), or the tanh approximation; math in fp32."""
    import torch.nn.functional as F

    return F.gelu(x.to(_acc_dtype(x)), approximate=approximate).to(x.dtype)


def relative_position_bias_ref(position_bias: RelativePositionBias, seqlen_q: int, seqlen_k: int, dtype=torch.float32):
    """T5's bias as a (n_heads, seqlen_q, seqlen_k) tensor: table[bucket(j - (i + seqlen_k - seqlen_q)), h]
    (query positions bottom-right aligned, like the causal mask). Differentiable in the table."""
    table = position_bias.table
    i = torch.arange(seqlen_q, device=table.device).unsqueeze(1) + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=table.device).unsqueeze(0)
    buckets = relative_position_bucket(j - i, position_bias.bidirectional, table.shape[0], position_bias.max_distance)
    return table.to(dtype)[buckets].permute(2, 0, 1)


def attention_ref(q, k, v, causal=False, softmax_scale=None, return_lse=False, position_bias=None):
    """Scaled dot-product attention with GQA and bottom-right causal alignment; math in fp32 (fp64).

    q: (batch, seqlen_q, n_heads, head_dim); k, v: (batch, seqlen_k, n_kv_heads, head_dim), n_heads a
    multiple of n_kv_heads (query head h reads kv head h // (n_heads // n_kv_heads)). Causal masks key j
    for query i when j > i + seqlen_k - seqlen_q (FlashAttention >= 2.1). A query with every key masked
    gets a zero output and lse = -inf. Returns out (q's shape and dtype), and with return_lse the
    log-sum-exp of the scaled scores, (batch, n_heads, seqlen_q) fp32 (fp64 for fp64 inputs).
    position_bias (a RelativePositionBias) adds T5's bias to the scaled scores before the mask;
    gradients reach its table through autograd.
    Materialises the (seqlen_q x seqlen_k) scores: an oracle, not a kernel.
    """
    acc = _acc_dtype(q)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    group = h // hkv
    kf = k.to(acc).repeat_interleave(group, dim=2)
    vf = v.to(acc).repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), kf) * scale
    if position_bias is not None:
        s = s + relative_position_bias_ref(position_bias, sq, sk, acc)
    if causal:
        i = torch.arange(sq, device=q.device).unsqueeze(1)
        j = torch.arange(sk, device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (b, h, sq); -inf where every key is masked
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(acc).min))
    p = torch.where(torch.isneginf(lse).unsqueeze(-1), torch.zeros_like(p), p)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype)
    return (out, lse) if return_lse else out


def attention_varlen_ref(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    causal=False,
    softmax_scale=None,
    return_lse=False,
    position_bias=None,
):
    """attention_ref over a packed batch: q (total_q, n_heads, head_dim), k/v (total_k, n_kv_heads,
    head_dim); sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q (likewise k/v). lse, if
    returned: (n_heads, total_q). max_seqlen_* are accepted for API symmetry and not needed here."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qi, ki, vi = q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]], v[ck[i] : ck[i + 1]]
        o, l = attention_ref(qi[None], ki[None], vi[None], causal, softmax_scale, True, position_bias)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=_acc_dtype(q))
    return (out, lse) if return_lse else out


def attention_bwd_ref(dout, q, k, v, out, lse, causal=False, softmax_scale=None, position_bias=None):
    """Gradients (dq, dk, dv) of attention_ref from its saved out and lse, without re-running autograd:
    P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K * scale,
    dK = dS^T Q * scale; GQA sums dK/dV over each kv head's query group. Shapes as attention_ref,
    lse (batch, n_heads, seqlen_q). Materialises one (seqlen_q x seqlen_k) block per head.
    With position_bias it also returns dtable (num_buckets, n_heads) fp32: dS summed per bucket and head."""
    acc = _acc_dtype(q)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    qf, do, of = (t.to(acc).transpose(1, 2) for t in (q, dout, out))  # (b, h, sq, d)
    kf, vf = (t.to(acc).transpose(1, 2).repeat_interleave(group, dim=1) for t in (k, v))  # (b, h, sk, d)
    p = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)  # scores, then probabilities in place
    if position_bias is not None:
        p.add_(relative_position_bias_ref(position_bias, sq, sk, acc).detach())
    if causal:
        i = torch.arange(sq, device=q.device).unsqueeze(1)
        j = torch.arange(sk, device=q.device).unsqueeze(0)
        p.masked_fill_(j > i + (sk - sq), float("-inf"))
    lse = lse.to(acc).unsqueeze(-1)
    p.sub_(torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)).exp_()  # fully masked rows -> 0
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = torch.matmul(do, vf.transpose(-1, -2))
    ds.sub_((do * of).sum(-1, keepdim=True)).mul_(p)
    dq = torch.matmul(ds, kf).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qf).mul_(scale)
    dk, dv = (t.view(b, hkv, group, sk, d).sum(2) for t in (dk, dv))
    grads = dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)
    if position_bias is None:
        return grads
    return (*grads, _dtable_ref(ds.sum(0), position_bias, sq, sk))


def _dtable_ref(ds, position_bias, seqlen_q, seqlen_k):
    """dS (n_heads, seqlen_q, seqlen_k) summed into the table's (num_buckets, n_heads) cells, fp32."""
    table = position_bias.table
    i = torch.arange(seqlen_q, device=ds.device).unsqueeze(1) + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=ds.device).unsqueeze(0)
    buckets = relative_position_bucket(j - i, position_bias.bidirectional, table.shape[0], position_bias.max_distance)
    dtable = torch.zeros(table.shape[::-1], dtype=ds.dtype, device=ds.device)  # (n_heads, num_buckets)
    dtable.index_add_(1, buckets.flatten(), ds.flatten(1))
    return dtable.t().float()


def attention_varlen_bwd_ref(
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None, position_bias=None
):
    """attention_bwd_ref per packed sequence; lse (n_heads, total_q). With position_bias, dtable too."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dtable = None if position_bias is None else torch.zeros(position_bias.table.shape, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if cq[i + 1] == cq[i] or ck[i + 1] == ck[i]:
            continue
        g = attention_bwd_ref(
            dout[qs][None],
            q[qs][None],
            k[ks][None],
            v[ks][None],
            out[qs][None],
            lse[:, qs][None],
            causal,
            softmax_scale,
            position_bias,
        )
        dq[qs], dk[ks], dv[ks] = g[0][0], g[1][0], g[2][0]
        if dtable is not None:
            dtable += g[3]
    return (dq, dk, dv) if dtable is None else (dq, dk, dv, dtable)


def gather_paged_kv(cache, block_table, seqlen, batch_index):
    """The first seqlen (key or value) rows of sequence batch_index from a paged cache
    (num_blocks, block_size, n_kv_heads, head_dim) -> (seqlen, n_kv_heads, head_dim)."""
    bs = cache.shape[1]
    n_blocks = (seqlen + bs - 1) // bs
    blocks = block_table[batch_index, :n_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:seqlen]


def paged_attention_ref(q, k_cache, v_cache, block_table, cache_seqlens, softmax_scale=None, position_bias=None):
    """Attention of a few new query tokens per sequence over a paged KV cache.

    q: (batch, seqlen_q, n_heads, head_dim), the newest seqlen_q tokens of each sequence, whose K/V are
    already in the cache; k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim);
    block_table: (batch, max_blocks) int32, logical block -> physical block; cache_seqlens: (batch,)
    int32, tokens in the cache per sequence (including the new ones). Query i of sequence b sits at
    position cache_seqlens[b] - seqlen_q + i and attends to keys up to and including it (causal,
    bottom-right aligned). Returns (batch, seqlen_q, n_heads, head_dim) in q's dtype. position_bias:
    T5's bias at those positions (query i at cache_seqlens[b] - seqlen_q + i, key j at j).
    """
    outs = []
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        kb = gather_paged_kv(k_cache, block_table, n, b)
        vb = gather_paged_kv(v_cache, block_table, n, b)
        outs.append(
            attention_ref(
                q[b : b + 1], kb[None], vb[None], causal=True, softmax_scale=softmax_scale, position_bias=position_bias
            )
        )
    return torch.cat(outs) if outs else q.clone()


def write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping):
    """Stores k, v (num_tokens, n_kv_heads, head_dim) into the paged caches in place: token t goes to
    slot slot_mapping[t] = block * block_size + offset; a negative slot (padding) is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def apply_token_bitmask_ref(logits, bitmask, rows=None):
    """Structured output's token mask, in place: logits (n, vocab); bitmask (m, ceil(vocab / 32)) int32,
    token j of mask row i allowed iff bit j % 32 (least significant first) of word j // 32 is set; rows
    (m,): the logits row of each mask row (None: row i). Disallowed logits become -inf; a row listed
    twice gets the intersection of its masks. Returns logits."""
    n, vocab = logits.shape
    m = bitmask.shape[0]
    idx = torch.arange(m, device=logits.device) if rows is None else rows.long()
    bits = torch.arange(32, device=logits.device)
    allowed = ((bitmask.long()[:, :, None] >> bits) & 1).flatten(1)[:, :vocab]  # (m, vocab) 0/1
    disallowed = torch.zeros(n, vocab, dtype=torch.int32, device=logits.device)
    disallowed.index_add_(0, idx, (1 - allowed).to(torch.int32))
    logits.masked_fill_(disallowed > 0, float("-inf"))
    return logits


# ---- GGUF quantized weights (ggml's block layouts, as gguf.quants reads them) ----------------------

# ggml type id -> (values, bytes) of one block.
GGUF_BLOCKS = {2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 14: (256, 210)}


def _half(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) fp32: the little-endian fp16 each row holds."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n): the low nibbles of the n bytes, then their high nibbles."""
    return torch.cat([q & 15, q >> 4], dim=-1)


def dequantize_gguf_ref(qweight: torch.Tensor, qtype: int) -> torch.Tensor:
    """(N, row_bytes) uint8 rows of ggml blocks of type `qtype` -> (N, K) fp32, the same fp32 operations
    in the same order as gguf.quants.dequantize (so the same bits)."""
    values, nbytes = GGUF_BLOCKS[qtype]
    rows = qweight.shape[0]
    b = qweight.reshape(-1, nbytes)
    n = b.shape[0]
    if qtype == 8:  # Q8_0: d, 32 int8
        out = b[:, 2:].contiguous().view(torch.int8).float() * _half(b[:, :2])
    elif qtype == 2:  # Q4_0: d, 16 bytes of nibbles; v = d * (q - 8)
        out = _half(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    elif qtype == 3:  # Q4_1: d, m, nibbles; v = d * q + m
        out = _half(b[:, :2]) * _nibbles(b[:, 4:]).float() + _half(b[:, 2:4])
    elif qtype == 12:  # Q4_K: d, dmin, 12 bytes of 6-bit scales / mins, 128 bytes of nibbles
        s = b[:, 4:16].reshape(n, 3, 4)
        lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
        sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], dim=1).float()
        mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], dim=1).float()
        q = b[:, 16:].reshape(n, 4, 1, 32)
        q = torch.cat([q & 15, q >> 4], dim=2).reshape(n, 8, 32).float()
        d = (_half(b[:, :2]) * sc).unsqueeze(-1)
        dm = (_half(b[:, 2:4]) * mn).unsqueeze(-1)
        out = d * q - dm
    elif qtype == 14:  # Q6_K: ql (128), qh (64), 16 int8 scales, d
        ql = b[:, :128].reshape(n, 2, 1, 64)
        ql = torch.cat([ql & 15, ql >> 4], dim=2).reshape(n, 8, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).float().reshape(n, 16, 16)
        d = (_half(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
        out = d * q
    else:
        raise ValueError(f"no reference dequantization for GGUF type id {qtype}")
    return out.reshape(rows, -1)


def linear_q_ref(x, qweight, qtype, bias=None):
    """linear_ref(x, the dequantized weight in x's dtype's accumulation type, bias)."""
    w = dequantize_gguf_ref(qweight, qtype)
    return linear_ref(x, w.to(_acc_dtype(x)), bias)
