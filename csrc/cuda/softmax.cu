// Softmax forward / backward on CUDA (contract in softmax.h).
//
// One thread block per row. Pass 1: every thread keeps an online (max, sum of exp) over its strided
// columns; the pairs are merged across the warp with shuffles and across warps through shared
// memory. Pass 2 re-reads the row (from L2 for rows that were just read) and writes
// exp(v - max) / sum. Any row length works; fp32 math for every input dtype.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits>

#include "common/checks.h"
#include "softmax.h"

namespace plm_engine {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(c10::Half v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

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
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < n_warps ? part[lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  return v;
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

Tensor softmax_fwd_cuda(const Tensor& x, double scale, bool causal) {
  check_softmax_fwd_args(x, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1), sq = x.size(1), sk = x.size(2);
  if (y.numel() == 0) return y;
  TORCH_CHECK(rows <= 2147483647, "softmax: too many rows for one grid (", rows, ")");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cuda", [&] {
    softmax_fwd_kernel<scalar_t><<<static_cast<unsigned>(rows), threads_for(sk), 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sq, sk, static_cast<float>(scale), causal);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

Tensor softmax_bwd_cuda(const Tensor& dy, const Tensor& y, double scale) {
  check_softmax_bwd_args(dy, y, scale);
  const c10::cuda::CUDAGuard guard(y.device());
  Tensor dx = at::empty_like(y);
  const int64_t rows = y.size(0) * y.size(1), n = y.size(2);
  if (dx.numel() == 0) return dx;
  TORCH_CHECK(rows <= 2147483647, "softmax: too many rows for one grid (", rows, ")");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_bwd_cuda", [&] {
    softmax_bwd_kernel<scalar_t><<<static_cast<unsigned>(rows), threads_for(n), 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n,
        static_cast<float>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CUDA, m) {
  m.impl("softmax_fwd", &plm_engine::softmax_fwd_cuda);
  m.impl("softmax_bwd", &plm_engine::softmax_bwd_cuda);
}
