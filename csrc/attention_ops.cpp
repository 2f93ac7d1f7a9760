// The attention family's schemas and the argument checks its CPU and CUDA entry points share (attention.h).
#include <torch/library.h>

#include "attention.h"
#include "common/checks.h"

namespace plm_engine {

static void check_heads(const Tensor& q, const Tensor& k) {
  const int64_t h = q.size(-2), hkv = k.size(-2), d = q.size(-1);
  TORCH_CHECK(k.size(-1) == d, "q head_dim ", d, " != k head_dim ", k.size(-1));
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "n_heads (", h, ") must be a multiple of n_kv_heads (", hkv, ")");
  TORCH_CHECK(d % 8 == 0 && d >= 8 && d <= 256, "head_dim must be a multiple of 8 in [8, 256], got ", d);
}

void check_attn_args(const Tensor& q, const Tensor& k, const Tensor& v, int64_t lead_dims) {
  TORCH_CHECK(q.dim() == lead_dims + 2 && k.dim() == lead_dims + 2 && v.dim() == lead_dims + 2, "q, k, v must have ",
              lead_dims + 2, " dims, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  PLM_CHECK_FLOAT(q);
  PLM_CHECK_SAME_DTYPE(k, q);
  PLM_CHECK_SAME_DTYPE(v, q);
  PLM_CHECK_SAME_DEVICE(k, q);
  PLM_CHECK_SAME_DEVICE(v, q);
  PLM_CHECK_SHAPE(v, k);
  for (const Tensor* t : {&q, &k, &v}) TORCH_CHECK(t->stride(-1) == 1, "q, k, v must be contiguous in head_dim");
  if (lead_dims == 2) TORCH_CHECK(k.size(0) == q.size(0), "batch of k (", k.size(0), ") != batch of q (", q.size(0), ")");
  check_heads(q, k);
}

void check_attn_bwd_args(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q,
                         at::IntArrayRef lse_shape) {
  PLM_CHECK_SHAPE(dout, q);
  PLM_CHECK_SHAPE(out, q);
  PLM_CHECK_SAME_DTYPE(dout, q);
  PLM_CHECK_SAME_DTYPE(out, q);
  PLM_CHECK_SAME_DEVICE(dout, q);
  PLM_CHECK_SAME_DEVICE(out, q);
  PLM_CHECK_SAME_DEVICE(lse, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape, "lse must be float32 of shape ",
              lse_shape, ", got ", lse.scalar_type(), " ", lse.sizes());
}

void check_varlen_args(const Tensor& q, const Tensor& k, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k) {
  for (const Tensor* t : {&cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->numel() >= 1,
                "cu_seqlens must be 1-d int32 with batch + 1 entries, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device() == q.device(), "cu_seqlens is on ", t->device(), " but q is on ", q.device());
    TORCH_CHECK(t->is_contiguous(), "cu_seqlens must be contiguous");
  }
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel(), "cu_seqlens_q and cu_seqlens_k sizes differ");
}

void check_paged_args(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                      const Tensor& cache_seqlens) {
  TORCH_CHECK(q.dim() == 4, "q must be (batch, seqlen_q, n_heads, head_dim), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be (num_blocks, block_size, n_kv_heads, head_dim), got ",
              k_cache.sizes());
  PLM_CHECK_FLOAT(q);
  PLM_CHECK_SHAPE(v_cache, k_cache);
  PLM_CHECK_SAME_DTYPE(k_cache, q);
  PLM_CHECK_SAME_DTYPE(v_cache, q);
  PLM_CHECK_SAME_DEVICE(k_cache, q);
  PLM_CHECK_SAME_DEVICE(v_cache, q);
  PLM_CHECK_CONTIGUOUS(k_cache);
  PLM_CHECK_CONTIGUOUS(v_cache);
  TORCH_CHECK(q.stride(-1) == 1, "q must be contiguous in head_dim");
  const int64_t bs = k_cache.size(1);
  TORCH_CHECK(bs > 0 && (bs & (bs - 1)) == 0 && bs <= 256, "block_size must be a power of two <= 256, got ", bs);
  check_heads(q, k_cache);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == q.size(0),
              "block_table must be (batch, max_blocks) int32, got ", block_table.scalar_type(), " ",
              block_table.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == q.size(0),
              "cache_seqlens must be (batch,) int32, got ", cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  PLM_CHECK_SAME_DEVICE(block_table, q);
  PLM_CHECK_SAME_DEVICE(cache_seqlens, q);
  PLM_CHECK_CONTIGUOUS(block_table);
  PLM_CHECK_CONTIGUOUS(cache_seqlens);
}

void check_bias_args(const Tensor& table, const Tensor& buckets, const Tensor& q) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(1) == q.size(-2),
              "position bias table must be float32 (num_buckets, ", q.size(-2), "), got ", table.scalar_type(), " ",
              table.sizes());
  TORCH_CHECK(buckets.scalar_type() == at::kInt && buckets.dim() == 1 && buckets.numel() % 2 == 1,
              "position bias buckets must be int32 (2 * max_distance + 1,), got ", buckets.scalar_type(), " ",
              buckets.sizes());
  PLM_CHECK_SAME_DEVICE(table, q);
  PLM_CHECK_SAME_DEVICE(buckets, q);
  PLM_CHECK_CONTIGUOUS(table);
  PLM_CHECK_CONTIGUOUS(buckets);
}

void check_write_kv_args(const Tensor& k, const Tensor& v, const Tensor& k_cache, const Tensor& v_cache,
                         const Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be (num_blocks, block_size, n_kv_heads, head_dim), got ",
              k_cache.sizes());
  PLM_CHECK_SHAPE(v_cache, k_cache);
  PLM_CHECK_SAME_DTYPE(v_cache, k_cache);
  PLM_CHECK_CONTIGUOUS(k_cache);
  PLM_CHECK_CONTIGUOUS(v_cache);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), "k must be (num_tokens, ",
              k_cache.size(2), ", ", k_cache.size(3), "), got ", k.sizes());
  PLM_CHECK_SHAPE(v, k);
  PLM_CHECK_FLOAT(k);
  PLM_CHECK_FLOAT(k_cache);
  PLM_CHECK_SAME_DTYPE(v, k);
  for (const Tensor* t : {&k, &v, &v_cache, &slot_mapping}) PLM_CHECK_SAME_DEVICE((*t), k_cache);
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1, "k, v must be contiguous in head_dim");
  TORCH_CHECK((slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong) &&
                  slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
              "slot_mapping must be (num_tokens,) int32/int64, got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  PLM_CHECK_CONTIGUOUS(slot_mapping);
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q,"
        " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("paged_attn(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor cache_seqlens,"
        " float scale) -> Tensor");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  // With T5's relative position bias (plm_engine/ops/contracts/attention.py, paged_attention.py).
  m.def("attn_rpb_fwd(Tensor q, Tensor k, Tensor v, Tensor table, Tensor buckets, bool causal, float scale)"
        " -> (Tensor, Tensor)");
  m.def("attn_rpb_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor table,"
        " Tensor buckets, bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attn_varlen_rpb_fwd(Tensor q, Tensor k, Tensor v, Tensor table, Tensor buckets, Tensor cu_seqlens_q,"
        " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("attn_varlen_rpb_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor table,"
        " Tensor buckets, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k,"
        " bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("paged_attn_rpb(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor cache_seqlens,"
        " Tensor table, Tensor buckets, float scale) -> Tensor");
}
