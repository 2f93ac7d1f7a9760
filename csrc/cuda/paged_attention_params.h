// The parameter blocks of the paged-attention kernels (paged_attention_kernels.cuh), kept apart from
// the kernels: plain structs with nothing CUDA in them, so that the CUDA emulator's launch interface
// (csrc/testing/emu_launchers.h, no kernel headers) takes them as they are instead of copying a mirror
// of their fields.
#pragma once

#include <cstdint>

namespace plm_engine {

struct PagedParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int* block_table;
  const int* cache_seqlens;
  void* out;          // (batch, seqlen_q, n_heads, head_dim), contiguous
  float* part_out;    // (batch, seqlen_q, n_heads, num_splits, head_dim) when num_splits > 1
  float* part_lse;    // (batch, seqlen_q, n_heads, num_splits), log2 units
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t cache_stride_block, cache_stride_slot;  // elements; the head stride is head_dim
  int64_t bt_stride;
  int seqlen_q, n_heads, group, n_rows, row_tiles, head_dim, page_shift, num_splits;
  float scale_log2;
  // T5's relative position bias, or nullptr: per head, 2 * max_distance + 1 fp32 values in log2 units,
  // bias[h * (2 * max_distance + 1) + max_distance + r] for key - query position r, clamped to
  // [-max_distance, max_distance] (plm_engine/ops/position_bias.py).
  const float* bias = nullptr;
  int max_distance = 0;
};

struct WriteParams {
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  const void* slots;
  bool slots_int64;
  int64_t n_tokens, k_stride_t, k_stride_h, v_stride_t, v_stride_h;
  int n_kv_heads, head_dim;
};

}  // namespace plm_engine
