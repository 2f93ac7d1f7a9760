// The kernels of softmax.cu and their block size (kernel headers: cuda/common.cuh).
#pragma once

#include "cuda/common.cuh"

namespace plm_engine {
namespace {

// Merges two online-softmax partials (m, s): s is a sum of exp(v - m). A partial with m = -inf is
// empty; guarding it avoids exp(-inf - -inf) = NaN.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (m2 == kNegInf) return;
  if (m == kNegInf) {
    m = m2;
    s = s2;
    return;
  }
  const float mx = fmaxf(m, m2);
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

// Block-wide merge of every thread's (m, s); all threads get the result.
__device__ __forceinline__ void block_merge(float& m, float& s) {
  __shared__ float sm[32], ss[32];
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, off);
    const float s2 = __shfl_xor_sync(0xffffffff, s, off);
    merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) sm[warp] = m, ss[warp] = s;
  __syncthreads();
  m = lane < n_warps ? sm[lane] : kNegInf;
  s = lane < n_warps ? ss[lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, off);
    const float s2 = __shfl_xor_sync(0xffffffff, s, off);
    merge(m, s, m2, s2);
  }
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < n_warps ? part[lane] : 0.f;
  return warp_sum(v);
}

template <typename T>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t sq, int64_t sk, float scale,
                                   bool causal) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * sk;
  T* yr = y + row * sk;
  int64_t valid = sk;
  if (causal) {
    const int64_t last = row % sq + sk - sq;  // last visible key of this query
    valid = last < 0 ? 0 : (last + 1 < sk ? last + 1 : sk);
  }
  float m = kNegInf, s = 0.f;
  for (int64_t i = threadIdx.x; i < valid; i += blockDim.x) {
    const float v = to_float(xr[i]) * scale;
    if (v == kNegInf) continue;
    if (v > m) {
      s = (m == kNegInf ? 0.f : s * __expf(m - v)) + 1.f;
      m = v;
    } else {
      s += __expf(v - m);
    }
  }
  block_merge(m, s);
  // s == 0: no finite visible entry -> zeros (shift 0 keeps exp(-inf) = 0 finite-safe).
  const float inv = s > 0.f ? 1.f / s : 0.f;
  const float shift = s > 0.f ? m : 0.f;
  for (int64_t i = threadIdx.x; i < sk; i += blockDim.x) {
    const float p = i < valid ? __expf(to_float(xr[i]) * scale - shift) * inv : 0.f;
    yr[i] = static_cast<T>(p);
  }
}

template <typename T>
__global__ void softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t n,
                                   float scale) {
  const int64_t row = blockIdx.x;
  const T* dyr = dy + row * n;
  const T* yr = y + row * n;
  T* dxr = dx + row * n;
  float dot = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dot += to_float(dyr[i]) * to_float(yr[i]);
  dot = block_sum(dot);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    dxr[i] = static_cast<T>(scale * to_float(yr[i]) * (to_float(dyr[i]) - dot));
}

// Threads per row: enough to cover short rows in one sweep, 1024 for long ones.
int threads_for(int64_t n) {
  int t = 32;
  while (t < 1024 && t * 4 < n) t *= 2;
  return t;
}

}  // namespace
}  // namespace plm_engine
