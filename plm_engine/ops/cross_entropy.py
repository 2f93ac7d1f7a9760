"""Fused cross-entropy and the chunked LM-head + cross-entropy (linear_cross_entropy), on every backend.

Every fused backend implements the same pair of kernel ops (plm_engine/ops/contracts/cross_entropy.py):
  cross_entropy_fwd(logits, target, ignore_index, label_smoothing) -> (loss, dlogits)
  cross_entropy_fwd_inplace(logits!, target, ignore_index, label_smoothing) -> loss
on (N, V) contiguous logits and (N,) int64 targets; loss is each row's fp32 loss and dlogits the
gradient of that row's loss alone. One pass over the logits gives both, so backward never revisits
them (Liger-Kernel's scheme). The C++ kernels register them as torch.ops.plm_engine.* (CPU key), the
Triton kernels as plm_engine::triton_cross_entropy_fwd[_inplace].

Memory behaviour of cross_entropy(logits, ...), with (N, V) logits:
  default               forward allocates ONE (N, V) buffer for the gradient and saves it; backward
                        scales it in place by the upstream gradient and hands that same buffer on as
                        the logits' gradient. Peak: logits + 1 buffer (PyTorch: logits + saved
                        log-softmax + gradient). Backward can run once (a second run raises).
  inplace_backward=True the gradient overwrites the logits themselves: no (N, V) buffer is allocated
                        at all. The caller's logits hold gradients afterwards, so use it only when
                        nothing else needs them (the usual LM-head case).
linear_cross_entropy goes further: the (N, V) logits never exist, only (chunk_size, V) at a time.
"""

from __future__ import annotations

import torch

from plm_engine.ops import backends, checks
from plm_engine.ops.contracts import cross_entropy as contract
from plm_engine.ops.reference import cross_entropy_ref, linear_cross_entropy_ref

REDUCTIONS = ("mean", "sum", "none")

backends.register_family(contract, ("cross_entropy_fwd",), "plm_engine.ops.triton.cross_entropy")


def fused_ops(backend: str):
    """(fwd, fwd_inplace) ops of a fused backend: 'triton', or 'cpu'/'cuda' (the _C ops, by device)."""
    return backends.family_ops("cross_entropy_fwd", backend, ("cross_entropy_fwd", "cross_entropy_fwd_inplace"))


class _FusedCrossEntropy(torch.autograd.Function):
    """Per-row losses; the gradient buffer (a new one, or the logits themselves when inplace) is
    saved and scaled in place by the upstream gradient in backward (see the module docstring).
    Backward can run once: a second run finds the buffer modified and autograd raises."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, ops, inplace):
        fwd, fwd_inplace = ops
        if inplace:
            loss = fwd_inplace(logits, target, ignore_index, label_smoothing)
            dlogits = logits  # now holding d loss[i] / d logits[i]
        else:
            loss, dlogits = fwd(logits, target, ignore_index, label_smoothing)
        ctx.save_for_backward(dlogits)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (dlogits,) = ctx.saved_tensors
        if dloss.dim() == 1 and dloss.numel() and dloss.stride(0) == 0:
            # "mean"/"sum": one upstream value broadcast to every row. A 0-dim factor keeps the in-place
            # multiply in dlogits' dtype; an fp32 (N, 1) factor on 16-bit dlogits takes a far slower
            # promotion path (figures in benchmarks/results/NOTES.md).
            return dlogits.mul_(dloss[0]), None, None, None, None, None
        return dlogits.mul_(dloss.unsqueeze(1)), None, None, None, None, None


# ---- argument checks ---------------------------------------------------------------------------------


def _check_common(name, target, lead_shape, device, n_classes, ignore_index, label_smoothing, reduction):
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"{name}: target must be an int64 (or int32) tensor of class indices, got {got}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"{name}: target shape {tuple(target.shape)} must be {tuple(lead_shape)}")
    if target.device != device:
        raise ValueError(f"{name}: target is on {target.device} but the inputs are on {device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if n_classes < 1:
        raise ValueError(f"{name}: need at least one class, got {n_classes}")
    if target.numel() and checks.value_checks():
        # Where the targets enter (ops/checks.py); in the hot path the kernels make such rows NaN.
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: target value {int(target.reshape(-1)[i])} (at flat index {i}) is out of "
                f"range for {n_classes} classes (ignore_index={ignore_index})"
            )


def _unsupported(dtype) -> dict[str, str]:
    if dtype in contract.KERNEL_DTYPES:
        return {}
    why = f"the fused kernels take float32/float16/bfloat16, got {dtype}"
    return dict.fromkeys(("triton", "cuda", "cpu"), why)


def _reduce(loss_rows, valid, reduction, shape, dtype):
    """Applies the reduction to fp32 per-row losses; 'mean' divides by the non-ignored count (>= 1)."""
    if reduction == "none":
        return loss_rows.view(shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        # A device tensor: no host sync.
        total = total / valid.sum().clamp(min=1)
    return total.to(dtype)


# ---- public functions --------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    *,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against class indices target (...), fused with its gradient.

    Same loss as F.cross_entropy (label smoothing included), fp32 math for fp16/bf16 logits, result in
    logits' dtype. reduction: "mean" over non-ignored tokens (0 if all are ignored), "sum", or "none"
    (target's shape). Tokens with target == ignore_index give loss 0 and gradient 0. Out-of-range
    targets raise ValueError for CPU tensors; on a GPU their loss and gradient are NaN (no sync).
    inplace_backward=True overwrites the logits with their gradient (see the module docstring).
    backend: "triton" | "cuda" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError("cross_entropy: logits must be a floating-point tensor of shape (..., V)")
    v = logits.shape[-1]
    _check_common(
        "cross_entropy", target, logits.shape[:-1], logits.device, v, ignore_index, label_smoothing, reduction
    )
    chosen = backends.choose(logits.device, "cross_entropy_fwd", backend, _unsupported(logits.dtype))
    if chosen == "torch":
        return cross_entropy_ref(logits, target, ignore_index, label_smoothing, reduction)
    x = logits.reshape(-1, v).contiguous()  # (N, V); the caller's buffer when logits is contiguous
    t = target.reshape(-1).to(torch.int64).contiguous()
    loss_rows = _FusedCrossEntropy.apply(
        x, t, int(ignore_index), float(label_smoothing), fused_ops(chosen), bool(inplace_backward)
    )
    return _reduce(loss_rows, t != ignore_index, reduction, target.shape, logits.dtype)


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Token rows per chunk: about as many logits per chunk as the hidden states hold (Liger's rule),
    a power of two, at least 1024: every chunk re-reads the (V, d) weight three times (logits, grad_hidden,
    grad_weight), so small chunks turn the head into a memory-bound loop (figures in
    benchmarks/results/NOTES.md).
    At SmolLM2's head (V=49152) a 1024-row chunk is 200 MB of fp32 logits, still a small part of the
    unfused (N, V) logits and their gradient."""
    rows = -(-n_tokens * hidden // max(vocab, 1))
    return max(1024, 1 << max(0, rows - 1).bit_length())


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked LM head + fused cross-entropy.

    Per chunk of token rows: logits = h @ W.T (+ b) (torch matmul), the fused kernel turns them in
    place into the chunk's dlogits, then grad_h = dlogits @ W and grad_W += dlogits.T @ h. For "mean"
    and "sum" this runs in forward (the reduction's scale is known then) and backward only multiplies
    the stored gradients by the upstream scalar. For "none" every row's upstream gradient is needed,
    so forward only keeps the losses and backward recomputes the chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, ce_op):
        valid = target != ignore_index
        # "mean": every row's gradient carries 1 / n_valid, a device scalar (no host sync).
        row_scale = 1.0 / valid.sum().clamp(min=1).float() if reduction == "mean" else 1.0
        need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]
        ctx.reduction, ctx.args = reduction, (ignore_index, label_smoothing, chunk_size, ce_op)
        if reduction == "none" or not any(need):
            loss_rows = _linear_ce_chunks(
                hidden,
                weight,
                target,
                bias,
                ignore_index,
                label_smoothing,
                chunk_size,
                ce_op,
                None,
                (False, False, False),
            )[0]
            ctx.save_for_backward(hidden, weight, target, bias)
            # With no gradient wanted (eval) "mean"/"sum" still reduce; only "none" keeps the rows.
            return (loss_rows if reduction == "none" else loss_rows.sum() * row_scale).to(hidden.dtype)
        loss_rows, gh, gw, gb = _linear_ce_chunks(
            hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, ce_op, row_scale, need
        )
        ctx.save_for_backward(gh, gw, gb)
        total = loss_rows.sum() * row_scale
        return total.to(hidden.dtype)

    @staticmethod
    def backward(ctx, dloss):
        if ctx.reduction == "none":
            hidden, weight, target, bias = ctx.saved_tensors
            ignore_index, label_smoothing, chunk_size, ce_op = ctx.args
            need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]
            _, gh, gw, gb = _linear_ce_chunks(
                hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, ce_op, dloss.float(), need
            )
        else:
            gh, gw, gb = ctx.saved_tensors
            g = dloss.to(torch.float32)
            # Stored gradients already carry the reduction's scale; apply the upstream gradient in place.
            gh = gh.mul_(g) if gh is not None else None
            gw = gw.mul_(g) if gw is not None else None
            gb = gb.mul_(g) if gb is not None else None
        return gh, gw, None, gb, None, None, None, None, None


def _linear_ce_chunks(hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, ce_op, row_scale, need):
    """Loops over token chunks; returns (fp32 per-row losses, grad_hidden, grad_weight, grad_bias).

    row_scale: None (no gradients wanted), 1.0, a scalar tensor, or an (N,) tensor of per-row factors
    applied to dlogits. need: which of (hidden, weight, bias) gradients to compute.
    """
    # The chunk matmuls run in the inputs' dtype: under autocast they would otherwise come out in
    # another dtype than the buffers they write into.
    with torch.autocast(hidden.device.type, enabled=False):
        return _linear_ce_chunks_impl(
            hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, ce_op, row_scale, need
        )


def _linear_ce_chunks_impl(
    hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, ce_op, row_scale, need
):
    n = hidden.shape[0]
    loss_rows = torch.empty(n, device=hidden.device, dtype=torch.float32)
    want_h, want_w, want_b = need if row_scale is not None else (False, False, False)
    gh = torch.empty_like(hidden) if want_h else None
    # fp32 accumulators: grad_weight sums over every chunk, so low-precision partial sums would drift.
    gw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_w else None
    gb = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if want_b else None
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        h = hidden[s:e]  # (chunk, d)
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (chunk, V)
        loss_rows[s:e] = ce_op(logits, target[s:e], ignore_index, label_smoothing)  # logits := dlogits
        if not (want_h or want_w or want_b):
            continue
        if isinstance(row_scale, torch.Tensor):
            logits.mul_(row_scale if row_scale.dim() == 0 else row_scale[s:e].unsqueeze(1))
        if want_h:
            torch.mm(logits, weight, out=gh[s:e])
        if want_w:
            if gw.dtype == logits.dtype:
                gw.addmm_(logits.t(), h)
            else:
                gw += logits.t() @ h
        if want_b:
            gb += logits.sum(0, dtype=torch.float32)
    if gw is not None:
        gw = gw.to(weight.dtype)
    if gb is not None:
        gb = gb.to(bias.dtype)
    return loss_rows, gh, gw, gb


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, target) without ever holding the (N, V) logits.

    hidden: (..., d); weight: (V, d) (the LM head / tied embedding); bias: (V,) or None; target:
    (...) class indices. Differentiable in hidden, weight and bias. The tokens are processed in chunks
    of chunk_size rows (default: default_chunk_size), so the extra memory is one (chunk_size, V) logits
    block plus fp32 accumulators for grad_weight (V, d) and grad_bias (V,). Loss semantics, dtype and
    errors as cross_entropy. backend picks the cross-entropy kernel ("torch": the unfused reference).
    """
    name = "linear_cross_entropy"
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        # The head matmuls run in the autocast dtype, as F.linear would; the cross-entropy math stays fp32.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    t: torch.Tensor | None  # the loops below check hidden and weight, then the optional bias
    for label, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name}: {label} must be a floating-point tensor")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name}: weight must have shape (V, {hidden.shape[-1] if hidden.dim() else '?'}) "
            f"to match hidden's last dim, got {tuple(weight.shape)}"
        )
    for label, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name}: {label} dtype {t.dtype} differs from hidden dtype {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name}: {label} is on {t.device} but hidden is on {hidden.device}")
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"{name}: bias must have shape ({v},), got {tuple(bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
    _check_common(name, target, hidden.shape[:-1], hidden.device, v, ignore_index, label_smoothing, reduction)
    chosen = backends.choose(hidden.device, "cross_entropy_fwd", backend, _unsupported(hidden.dtype))
    if chosen == "torch":
        return linear_cross_entropy_ref(hidden, weight, target, bias, ignore_index, label_smoothing, reduction)
    _, fwd_inplace = fused_ops(chosen)
    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d).contiguous()  # (N, d)
    t = target.reshape(-1).to(torch.int64).contiguous()
    chunk = chunk_size or default_chunk_size(h2.shape[0], v, d)
    loss = _LinearCrossEntropy.apply(
        h2, weight, t, bias, int(ignore_index), float(label_smoothing), reduction, chunk, fwd_inplace
    )
    return loss.view(target.shape) if reduction == "none" else loss
