// SwiGLU and GELU kernels of activations.cu (kernel headers: cuda/common.cuh).
#pragma once

#include "common/gelu.h"
#include "cuda/common.cuh"

namespace plm_engine {
namespace {

constexpr int kThreads = 256;

// Overflow-free logistic function.
__device__ __forceinline__ float sigmoidf(float z) {
  const float e = __expf(-fabsf(z));
  return z >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// gelu_tanh's 0.5 (1 + tanh(u)) = sigmoid(2u), u = k0 (x + k1 x^3): no cancellation for x << 0.
__device__ __forceinline__ float gelu_tanh_cdf(float x) { return sigmoidf(2.f * kTanhK0 * (x + kTanhK1 * x * x * x)); }

// normcdff is erfc-based, so Phi(x) keeps its relative accuracy deep in the negative tail where
// 0.5 (1 + erf(x / sqrt 2)) would cancel.
__device__ __forceinline__ float normal_cdf(float x) { return normcdff(x); }

struct SwigluFwd {
  static constexpr int NIN = 2, NOUT = 1;
  __device__ void operator()(const float (&in)[NIN], float (&out)[NOUT]) const {
    out[0] = in[0] * sigmoidf(in[0]) * in[1];
  }
};

struct SwigluBwd {  // in: dy, gate, up; out: dgate, dup
  static constexpr int NIN = 3, NOUT = 2;
  __device__ void operator()(const float (&in)[NIN], float (&out)[NOUT]) const {
    const float dy = in[0], g = in[1], u = in[2];
    const float sig = sigmoidf(g);
    out[0] = dy * u * sig * (1.f + g * (1.f - sig));  // d silu(g) / dg = sig (1 + g (1 - sig))
    out[1] = dy * g * sig;
  }
};

template <bool TANH>
struct GeluFwd {
  static constexpr int NIN = 1, NOUT = 1;
  __device__ void operator()(const float (&in)[NIN], float (&out)[NOUT]) const {
    out[0] = in[0] * (TANH ? gelu_tanh_cdf(in[0]) : normal_cdf(in[0]));
  }
};

template <bool TANH>
struct GeluBwd {  // in: dy, x; out: dx
  static constexpr int NIN = 2, NOUT = 1;
  __device__ void operator()(const float (&in)[NIN], float (&out)[NOUT]) const {
    const float x = in[1];
    float grad;
    if (TANH) {
      const float s = gelu_tanh_cdf(x);  // d/dx [x s(2u)] = s + x s (1 - s) 2 u'
      grad = s + x * s * (1.f - s) * 2.f * kTanhK0 * (1.f + 3.f * kTanhK1 * x * x);
    } else {
      grad = normal_cdf(x) + x * kInvSqrt2Pi * __expf(-0.5f * x * x);
    }
    out[0] = in[0] * grad;
  }
};

template <typename T, int NIN, int NOUT>
struct EltArgs {
  const T* in[NIN];
  int64_t in_row_stride[NIN];
  T* out[NOUT];  // contiguous (rows, n)
  int64_t rows, n;
};

template <typename T, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads) eltwise_kernel(EltArgs<T, Op::NIN, Op::NOUT> a, Op op) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= a.n) return;
  for (int64_t r = blockIdx.y; r < a.rows; r += gridDim.y) {
    float in[Op::NIN][VEC], out[Op::NOUT][VEC];
#pragma unroll
    for (int j = 0; j < Op::NIN; ++j) {
      const T* p = a.in[j] + r * a.in_row_stride[j] + col;
      if constexpr (VEC > 1) {
        const Pack<T, VEC> pk = load_pack<T, VEC>(p);
#pragma unroll
        for (int v = 0; v < VEC; ++v) in[j][v] = static_cast<float>(pk.val[v]);
      } else {
        in[j][0] = static_cast<float>(*p);
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float x[Op::NIN], y[Op::NOUT];
#pragma unroll
      for (int j = 0; j < Op::NIN; ++j) x[j] = in[j][v];
      op(x, y);
#pragma unroll
      for (int j = 0; j < Op::NOUT; ++j) out[j][v] = y[j];
    }
#pragma unroll
    for (int j = 0; j < Op::NOUT; ++j) {
      T* p = a.out[j] + r * a.n + col;
      if constexpr (VEC > 1) {
        Pack<T, VEC> pk;
#pragma unroll
        for (int v = 0; v < VEC; ++v) pk.val[v] = static_cast<T>(out[j][v]);
        store_pack<T, VEC>(p, pk);
      } else {
        *p = static_cast<T>(out[j][0]);
      }
    }
  }
}

}  // namespace
}  // namespace plm_engine
