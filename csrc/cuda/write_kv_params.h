// WriteParams from the tensors of a write_kv_cache call (checked first: check_write_kv_args), for the
// CUDA launcher (paged_attention.cu) and the CUDA emulator's bindings (csrc/testing/emu_bindings.cpp):
// one function, so that the emulated launch reads the tensors exactly as the real one does.
#pragma once

#include <torch/types.h>

#include "cuda/write_params.h"

namespace plm_engine {

// k, v: (n_tokens, n_kv_heads, head_dim) with a unit last stride; caches (blocks, block_size, n_kv_heads,
// head_dim), contiguous; slot_mapping int32 or int64 (n_tokens,).
inline WriteParams write_kv_params(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                   at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  WriteParams p;
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.k_cache = k_cache.mutable_data_ptr();
  p.v_cache = v_cache.mutable_data_ptr();
  p.slots = slot_mapping.const_data_ptr();
  p.slots_int64 = slot_mapping.scalar_type() == at::kLong;
  p.n_tokens = k.size(0);
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.n_kv_heads = static_cast<int>(k_cache.size(2));
  p.head_dim = static_cast<int>(k_cache.size(3));
  return p;
}

}  // namespace plm_engine
