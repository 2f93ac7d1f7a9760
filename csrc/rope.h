// Rotary position embedding (RoPE): the contract every device implements, and the argument checks their
// entry points share (rope_ops.cpp). Kernels: cpu/rope.cpp (CPU), cuda/rope.cu (CUDA).
//
// Contract of both ops (plm_engine/ops/rope.py builds these arguments from the public call):
//   q (batch, seqlen, q_heads, head_dim), k (batch, seqlen, k_heads, head_dim): same dtype (fp32, fp16,
//     bf16) and device; any strides with the last one 1 (so q/k may be views of a fused qkv tensor).
//   cos, sin (max_seqlen, rotary_dim / 2), rotary_dim <= head_dim: fp32 or q's dtype, any strides.
//   positions: int64 (batch, seqlen) contiguous, the position of each token; absent means the token's
//     index in its sequence (then seqlen <= max_seqlen).
//   Pairs (x[i], x[i + rotary_dim/2]), or (x[2i], x[2i+1]) when interleaved, become
//     (x1 cos - x2 sin, x2 cos + x1 sin); with conjugate the angle is negated (sin -> -sin), which is
//     the backward of the rotation. Features past rotary_dim pass through unchanged.
// rope returns new contiguous (q_out, k_out); rope_ rotates q and k in place.
#pragma once
#include <torch/types.h>

#include <optional>

namespace plm_engine {

using at::Tensor;

// Shapes, dtypes, devices and strides: what the kernels index (plm_engine.ops.rope checks the rest). The
// CPU kernel also checks the positions against the table, which it reads anyway.
void check_rope_args(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                     const std::optional<Tensor>& positions);

}  // namespace plm_engine
