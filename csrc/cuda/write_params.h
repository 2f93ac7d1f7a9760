// WriteParams, the parameter block of the KV-cache write kernel (paged_attention_kernels.cuh), kept
// apart from the kernels: a plain struct with nothing CUDA in it, so that the CUDA emulator's launch
// interface (csrc/testing/emu_launchers.h, no kernel headers) takes it as it is instead of copying a
// mirror of its fields. cuda/write_kv_params.h fills it from a call's tensors.
#pragma once

#include <cstdint>

namespace plm_engine {

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
