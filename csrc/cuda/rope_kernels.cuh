// RoPE kernels of rope.cu (kernel headers: cuda/common.cuh).
#pragma once

#include "cuda/common.cuh"

namespace plm_engine {
namespace {

constexpr int kThreads = 128;

struct RopeArgs {
  int64_t q_b, q_s, q_h, k_b, k_s, k_h;      // input strides (elements)
  int64_t qo_b, qo_s, qo_h, ko_b, ko_s, ko_h;  // output strides
  int64_t cos_row, cos_col;                   // cos/sin strides
  int64_t seqlen, n_pos;                      // sequence length, rows of cos/sin
  int hq, hk, half, head_dim;
  float sin_sign;
  bool copy_pass;
};

// Loads N consecutive elements as fp32: one vector load when ALIGNED, else element by element.
template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
  if constexpr (ALIGNED) {
    const Pack<T, N> pk = load_pack<T, N>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<float>(pk.val[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<float>(p[j]);
  }
}

template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
  if constexpr (ALIGNED) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.val[j] = static_cast<T>(in[j]);
    store_pack<T, N>(p, pk);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = static_cast<T>(in[j]);
  }
}

// PAIRS: pairs per item (VEC or VEC/2 on the aligned path, 1 otherwise).
template <typename T, typename C, bool INTERLEAVED, int PAIRS, bool ALIGNED>
__global__ void __launch_bounds__(kThreads) rope_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                        T* qo, T* ko, const C* __restrict__ cos,
                                                        const C* __restrict__ sin, const int64_t* __restrict__ pos,
                                                        RopeArgs a) {
  const int64_t tok = blockIdx.x;
  const int64_t b = tok / a.seqlen, s = tok % a.seqlen;
  const int64_t p = pos != nullptr ? pos[tok] : s;
  // plm_engine/ops/rope.py refuses out-of-range positions; a direct call gets NaN, not a wild read.
  const bool valid = p >= 0 && p < a.n_pos;
  const C* crow = cos + (valid ? p : 0) * a.cos_row;
  const C* srow = sin + (valid ? p : 0) * a.cos_row;
  const int items_per_head = a.half / PAIRS;
  const int items = (a.hq + a.hk) * items_per_head;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int h = it / items_per_head, i0 = (it % items_per_head) * PAIRS;
    const bool is_q = h < a.hq;
    const T* x = is_q ? q + b * a.q_b + s * a.q_s + h * a.q_h
                      : k + b * a.k_b + s * a.k_s + (h - a.hq) * a.k_h;
    T* y = is_q ? qo + b * a.qo_b + s * a.qo_s + h * a.qo_h
                : ko + b * a.ko_b + s * a.ko_s + (h - a.hq) * a.ko_h;
    float c[PAIRS], sn[PAIRS];
#pragma unroll
    for (int j = 0; j < PAIRS; ++j) {
      c[j] = valid ? static_cast<float>(crow[(i0 + j) * a.cos_col]) : NAN;
      sn[j] = valid ? a.sin_sign * static_cast<float>(srow[(i0 + j) * a.cos_col]) : NAN;
    }
    if constexpr (INTERLEAVED) {
      float v[2 * PAIRS];
      load_f32<T, 2 * PAIRS, ALIGNED>(x + 2 * i0, v);
#pragma unroll
      for (int j = 0; j < PAIRS; ++j) {
        const float x1 = v[2 * j], x2 = v[2 * j + 1];
        v[2 * j] = x1 * c[j] - x2 * sn[j];
        v[2 * j + 1] = x2 * c[j] + x1 * sn[j];
      }
      store_f32<T, 2 * PAIRS, ALIGNED>(y + 2 * i0, v);
    } else {
      float x1[PAIRS], x2[PAIRS], o1[PAIRS], o2[PAIRS];
      load_f32<T, PAIRS, ALIGNED>(x + i0, x1);
      load_f32<T, PAIRS, ALIGNED>(x + a.half + i0, x2);
#pragma unroll
      for (int j = 0; j < PAIRS; ++j) {
        o1[j] = x1[j] * c[j] - x2[j] * sn[j];
        o2[j] = x2[j] * c[j] + x1[j] * sn[j];
      }
      store_f32<T, PAIRS, ALIGNED>(y + i0, o1);
      store_f32<T, PAIRS, ALIGNED>(y + a.half + i0, o2);
    }
  }
  if (a.copy_pass) {
    // Partial rotary, out of place: features [2 * half, head_dim) are copied unchanged.
    const int rest = a.head_dim - 2 * a.half;
    for (int it = threadIdx.x; it < (a.hq + a.hk) * rest; it += blockDim.x) {
      const int h = it / rest, j = 2 * a.half + it % rest;
      if (h < a.hq) {
        qo[b * a.qo_b + s * a.qo_s + h * a.qo_h + j] = q[b * a.q_b + s * a.q_s + h * a.q_h + j];
      } else {
        const int hh = h - a.hq;
        ko[b * a.ko_b + s * a.ko_s + hh * a.ko_h + j] = k[b * a.k_b + s * a.k_s + hh * a.k_h + j];
      }
    }
  }
}

}  // namespace
}  // namespace plm_engine
