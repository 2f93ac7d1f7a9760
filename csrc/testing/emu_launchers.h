// Host launchers of the emulated CUDA kernels (csrc/testing/emu_<op>.cpp), called by the test
// extension's bindings (emu_bindings.cpp). Test-only, never part of plm_engine._C.
//
// Each op's kernels are compiled in a translation unit of their own: the kernel headers keep their
// helpers in anonymous namespaces (several define Pack, kThreads, merge, ...), and the light includes
// here (no ATen) keep those units quick to compile. Buffers cross this interface as raw pointers; the
// launchers mirror the real ones in csrc/cuda/<op>.cu (same kernel choice, block shape and grid),
// except where the real one asks the GPU (occupancy, SM count): there the test passes a value.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <stdexcept>

#include "cuda/write_params.h"  // a plain struct, no CUDA

namespace plm_emu_ops {

enum class Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Calls fn with a value of the C++ type of dt.
template <typename Fn>
void dispatch(Dtype dt, Fn&& fn) {
  switch (dt) {
    case Dtype::kF32: fn(float{}); break;
    case Dtype::kF16: fn(c10::Half{}); break;
    case Dtype::kBF16: fn(c10::BFloat16{}); break;
    case Dtype::kF64: fn(double{}); break;
    default: throw std::invalid_argument("cuda_emu: unsupported dtype");
  }
}

// ---- norms.cu ----
// max_blocks: cap on the forward grid (0: one block per row group, as on the GPU), so that small tests
// also run the grid-stride loop. bwd_blocks: the backward grid (the GPU launcher derives it from the
// occupancy), which sets how many rows each row group accumulates.
void norm_fwd(Dtype t, Dtype w, const void* x, const void* residual, const void* weight, const void* bias, void* y,
              void* h, float* mean, float* rstd, int64_t rows, int64_t n, float eps, bool is_rms, int64_t max_blocks);
void norm_bwd(Dtype t, Dtype w, const void* dy, const void* dh, const void* h, const void* weight, const float* mean,
              const float* rstd, void* dx, void* dw, void* db, int64_t rows, int64_t n, bool is_rms,
              int64_t bwd_blocks);

// ---- softmax.cu ---- x, y: (rows, sk) contiguous; causal rows are (batch, sq) query rows.
void softmax_fwd(Dtype t, const void* x, void* y, int64_t rows, int64_t sq, int64_t sk, float scale, bool causal);
void softmax_bwd(Dtype t, const void* dy, const void* y, void* dx, int64_t rows, int64_t n, float scale);

// ---- activations.cu ---- inputs (rows, n) with unit last stride and the given row strides; outputs
// contiguous. kind: "swiglu_fwd" (gate, up), "swiglu_bwd" (dy, gate, up -> dgate, dup), "gelu_fwd" (x),
// "gelu_bwd" (dy, x). max_grid_y caps the row grid (0: as on the GPU).
void activation(const char* kind, bool tanh, Dtype t, const void* const* in, const int64_t* in_row_stride, int n_in,
                void* const* out, int n_out, int64_t rows, int64_t n, int64_t max_grid_y);

// ---- rope.cu ----
struct RopeCall {
  Dtype t, c;  // q/k dtype, cos/sin dtype
  const void *q, *k, *cos, *sin;
  void *q_out, *k_out;
  const int64_t* positions;  // (batch, seqlen) or nullptr
  int64_t q_stride[4], k_stride[4], qo_stride[4], ko_stride[4], cos_stride[2];
  int64_t batch, seqlen, n_pos;
  int hq, hk, half, head_dim;
  bool interleaved, conjugate, inplace;
};
void rope(const RopeCall& c);

// ---- paged_attention.cu ----
struct PagedCall {
  Dtype t;
  const void *q, *k_cache, *v_cache;
  const int *block_table, *cache_seqlens;
  void* out;
  int64_t q_stride[3], cache_stride_block, cache_stride_slot, bt_stride;
  int64_t batch, seqlen_q, n_heads, head_dim, block_size, n_kv_heads;
  float scale;
  int num_splits;  // the GPU launcher derives it from the SM count
  const float* bias = nullptr;  // PagedParams::bias rows, or nullptr
  int max_distance = 0;
};
void paged_attn(const PagedCall& c);

// The kernel's own parameter block, as the bindings fill it: tin is k/v's dtype, tout the caches'.
void write_kv_cache(Dtype tin, Dtype tout, const plm_engine::WriteParams& p);

// ---- the emulator's own tests (emu_selftest.cpp): runs kernel `name`, writes int32 results to out ----
void selftest(const char* name, int* out, int64_t out_len, int blocks, int threads);

// The order in which the emulator resumes a block's threads ("forward", "reverse", "alternate": see
// plm_emu::Order) for the following launches; returns the previous one.
const char* set_order(const char* order);

}  // namespace plm_emu_ops
