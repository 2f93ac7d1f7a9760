// Attention (dense, varlen, paged decode, KV-cache write): the argument checks the entry points share
// (attention_ops.cpp). Contract (shapes, causal alignment, lse layout): plm_engine/ops/contracts/
// attention.py and paged_attention.py. Kernels: cpu/attention.cpp (CPU: every op),
// cuda/paged_attention.cu (CUDA: paged_attn, write_kv_cache).
//   attn_fwd(q, k, v, causal, scale) -> (out, lse)     q (b, sq, h, d), k/v (b, sk, hkv, d); lse (b, h, sq) fp32
//   attn_bwd(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)
//   attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out, lse)
//                                                       q (tq, h, d), k/v (tk, hkv, d); lse (h, tq) fp32
//   attn_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)
//   paged_attn(q, k_cache, v_cache, block_table, cache_seqlens, scale) -> out
//                                                       caches (num_blocks, block_size, hkv, d)
//   write_kv_cache(k, v, k_cache!, v_cache!, slot_mapping) -> ()
// With T5's relative position bias: table (num_buckets, n_heads) fp32, buckets int32 (2 * max_distance + 1,)
// (contracts/attention.py and paged_attention.py); CPU: all of them, CUDA: paged_attn_rpb.
//   attn_rpb_fwd(q, k, v, table, buckets, causal, scale) -> (out, lse)
//   attn_rpb_bwd(dout, q, k, v, out, lse, table, buckets, causal, scale) -> (dq, dk, dv, dtable)
//   attn_varlen_rpb_fwd(q, k, v, table, buckets, cu_q, cu_k, max_q, max_k, causal, scale) -> (out, lse)
//   attn_varlen_rpb_bwd(dout, q, k, v, out, lse, table, buckets, cu_q, cu_k, max_q, max_k, causal, scale)
//       -> (dq, dk, dv, dtable)
//   paged_attn_rpb(q, k_cache, v_cache, block_table, cache_seqlens, table, buckets, scale) -> out
#pragma once
#include <torch/types.h>

namespace plm_engine {

using at::Tensor;

// Shapes, dtypes, devices and strides: what the kernels index (plm_engine.ops.attention checks the rest).
// The CPU kernels also check the cu_seqlens, block ids and slots they read anyway; on a GPU such values
// are checked in Python, where data enters.
void check_attn_args(const Tensor& q, const Tensor& k, const Tensor& v, int64_t lead_dims);
// dout and out shaped and typed like q, lse fp32 of lse_shape.
void check_attn_bwd_args(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q,
                         at::IntArrayRef lse_shape);
void check_varlen_args(const Tensor& q, const Tensor& k, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k);
void check_paged_args(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                      const Tensor& cache_seqlens);
// table fp32 (num_buckets, n_heads of q) and buckets int32 (2 * max_distance + 1,), contiguous, on q's device.
void check_bias_args(const Tensor& table, const Tensor& buckets, const Tensor& q);
void check_write_kv_args(const Tensor& k, const Tensor& v, const Tensor& k_cache, const Tensor& v_cache,
                         const Tensor& slot_mapping);

}  // namespace plm_engine
