// Attention kernels of _C: declarations and the shared argument checks (attention_ops.cpp).
// Contract (shapes, causal alignment, lse layout): plm_engine/ops/attention.py's module docstring.
#pragma once
#include <torch/types.h>

#include <tuple>

namespace plm_engine {

using at::Tensor;

// q (b, sq, h, d), k/v (b, sk, hkv, d), last dim contiguous -> out (b, sq, h, d), lse (b, h, sq) fp32.
std::tuple<Tensor, Tensor> attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                        double scale);
// q (tq, h, d), k/v (tk, hkv, d), cu_seqlens int32 (batch + 1) -> out (tq, h, d), lse (h, tq) fp32.
std::tuple<Tensor, Tensor> attn_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                               double scale);
// Gradients of attn_fwd_cpu from dout (like q) and its saved out and lse -> (dq, dk, dv) like q, k, v.
std::tuple<Tensor, Tensor, Tensor> attn_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                const Tensor& v, const Tensor& out, const Tensor& lse, bool causal,
                                                double scale);
// Gradients of attn_varlen_fwd_cpu.
std::tuple<Tensor, Tensor, Tensor> attn_varlen_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                                       const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                       double scale);
// q (b, sq, h, d); caches (num_blocks, block_size, hkv, d); block_table (b, max_blocks) int32;
// cache_seqlens (b,) int32 -> out (b, sq, h, d).
Tensor paged_attn_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                      const Tensor& cache_seqlens, double scale);
void write_kv_cache_cpu(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache,
                        const Tensor& slot_mapping);
// With T5's relative position bias: table (num_buckets, n_heads) fp32, buckets int32 (2 * max_distance + 1)
// (plm_engine/ops/position_bias.py); the backward also returns dtable like table.
std::tuple<Tensor, Tensor> attn_rpb_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& table,
                                            const Tensor& buckets, bool causal, double scale);
std::tuple<Tensor, Tensor> attn_varlen_rpb_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& table, const Tensor& buckets,
                                                   const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                   double scale);
std::tuple<Tensor, Tensor, Tensor, Tensor> attn_rpb_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                                            const Tensor& table, const Tensor& buckets, bool causal,
                                                            double scale);
std::tuple<Tensor, Tensor, Tensor, Tensor> attn_varlen_rpb_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const Tensor& table, const Tensor& buckets, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale);
Tensor paged_attn_rpb_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                          const Tensor& cache_seqlens, const Tensor& table, const Tensor& buckets, double scale);
#ifdef PLM_ENGINE_WITH_CUDA
Tensor paged_attn_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                       const Tensor& cache_seqlens, double scale);
Tensor paged_attn_rpb_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                           const Tensor& cache_seqlens, const Tensor& table, const Tensor& buckets, double scale);
void write_kv_cache_cuda(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache,
                         const Tensor& slot_mapping);
#endif

// Shape / dtype / device checks (values such as block ids are checked in Python, off the hot path).
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
