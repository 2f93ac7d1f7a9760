"""T5's bucketed relative position bias, as the attention ops take it (position_bias=...).

score[h, i, j] += table[bucket(key_pos(j) - query_pos(i)), h], added to the scaled scores before the
causal mask and the softmax. Positions are bottom-right aligned like the causal mask: query row i of a
sequence with seqlen_q queries and seqlen_k keys sits at i + seqlen_k - seqlen_q, key j at j.

How the kernels see it: a relative position r only matters through bucket(r), and every |r| >=
max_distance falls into the last bucket of its side (T5's definition). So the kernels index a small
per-call lookup, `buckets`, int32 (2 * max_distance + 1,): buckets[r + max_distance] = bucket(r) for r
clamped to [-max_distance, max_distance]. It is computed here with relative_position_bucket itself,
which makes the kernels' buckets identical to transformers' formula (a log evaluated inside a kernel
can round the other way at the bucket edges, where log(n / max_exact) / log(max_distance / max_exact)
is an exact integer). The table stays (num_buckets, n_heads); nothing of size seqlen_q x seqlen_k exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_DISTANCE_LIMIT = 1 << 16  # the lookup has 2 * max_distance + 1 entries


@dataclass(frozen=True)
class RelativePositionBias:
    """T5's bucketed relative position bias: score[h, i, j] += table[bucket(key_pos(j) - query_pos(i)), h].

    table: (num_buckets, n_heads), any float dtype; gradients flow into it (attention, attention_varlen).
    bidirectional: True for encoder self-attention (keys on both sides), False for decoder
    self-attention (every key after the query shares bucket 0).
    """

    table: torch.Tensor
    bidirectional: bool
    max_distance: int = 128


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position), exactly as transformers'
    T5Attention._relative_position_bucket computes it (same operations, same fp32 rounding): half of
    the buckets (of each side, when bidirectional) hold the exact distances 0 .. max_exact - 1, the
    others logarithmically wider ranges up to max_distance, beyond which every distance shares the last
    bucket. Returns int64 buckets in [0, num_buckets), shaped like relative_position."""
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # log(0) = -inf turns into garbage under .long(); those positions are small and torch.where drops it.
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, if_large)


def check_bucket_params(fn: str, bidirectional: bool, num_buckets: int, max_distance: int) -> None:
    """T5's formula needs at least one exact bucket per side and max_distance beyond the exact range."""
    per_side = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_side // 2
    if max_exact < 1:
        raise ValueError(
            f"{fn}: position_bias needs num_buckets >= {4 if bidirectional else 2} "
            f"({'bidirectional' if bidirectional else 'unidirectional'}), got {num_buckets}"
        )
    if not isinstance(max_distance, int) or isinstance(max_distance, bool):
        raise ValueError(f"{fn}: position_bias.max_distance must be an int, got {max_distance!r}")
    if not max_exact < max_distance <= MAX_DISTANCE_LIMIT:
        raise ValueError(
            f"{fn}: position_bias.max_distance must lie in ({max_exact}, {MAX_DISTANCE_LIMIT}] for "
            f"{num_buckets} buckets, got {max_distance}"
        )


_LUT_CACHE: dict[tuple, torch.Tensor] = {}


def _capturing_or_compiling() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def bucket_lookup(bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """int32 (2 * max_distance + 1,): the bucket of each relative position r in [-max_distance,
    max_distance], at index r + max_distance. The kernels clamp r into that range (exact: T5's buckets
    are constant beyond it). Computed on `device` (the formula's fp32 log as transformers runs it there)
    and memoised per device; never memoised while a CUDA graph is captured or torch.compile traces, when
    the tensor would belong to the graph."""
    key = (bool(bidirectional), int(num_buckets), int(max_distance), torch.device(device))
    lut = _LUT_CACHE.get(key)
    if lut is not None:
        return lut
    if _capturing_or_compiling():
        rel = torch.arange(-max_distance, max_distance + 1, device=device)
        return relative_position_bucket(rel, bidirectional, num_buckets, max_distance).to(torch.int32)
    # A normal tensor even when first asked for under inference_mode: autograd saves it for backward.
    with torch.inference_mode(False):
        rel = torch.arange(-max_distance, max_distance + 1, device=device)
        lut = relative_position_bucket(rel, bidirectional, num_buckets, max_distance).to(torch.int32)
    _LUT_CACHE[key] = lut
    return lut


def check_position_bias(
    fn: str, position_bias: RelativePositionBias, n_heads: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates position_bias for n_heads query heads on `device`; returns what the backend ops take:
    (table as contiguous fp32 (num_buckets, n_heads), still differentiable; buckets int32 lookup)."""
    if not isinstance(position_bias, RelativePositionBias):
        raise TypeError(f"{fn}: position_bias must be a RelativePositionBias, got {type(position_bias).__name__}")
    table = position_bias.table
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.is_floating_point():
        raise ValueError(
            f"{fn}: position_bias.table must be a float (num_buckets, n_heads) tensor, got "
            f"{getattr(table, 'dtype', type(table))} {tuple(getattr(table, 'shape', ()))}"
        )
    if table.shape[1] != n_heads:
        raise ValueError(f"{fn}: position_bias.table has {table.shape[1]} heads, q has {n_heads}")
    if table.device != torch.device(device):
        raise ValueError(f"{fn}: position_bias.table is on {table.device} but q is on {device}")
    check_bucket_params(fn, position_bias.bidirectional, table.shape[0], position_bias.max_distance)
    lut = bucket_lookup(position_bias.bidirectional, table.shape[0], position_bias.max_distance, table.device)
    return table.float().contiguous(), lut


def bias_from_lookup(table: torch.Tensor, buckets: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """The (n_heads, seqlen_q, seqlen_k) bias the kernels add, from the backend ops' arguments (table
    (num_buckets, n_heads), buckets lookup): for references and tests, never for a kernel."""
    max_distance = (buckets.numel() - 1) // 2
    i = torch.arange(seqlen_q, device=table.device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=table.device)[None, :]
    idx = (j - i).clamp(-max_distance, max_distance) + max_distance
    return table[buckets.long()[idx]].permute(2, 0, 1)
