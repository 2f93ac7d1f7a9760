// SwiGLU and GELU on CUDA, forward and backward (contract in csrc/activations.h).
//
// One elementwise kernel template serves the four ops: a functor maps NIN fp32 inputs to NOUT fp32
// outputs per element. Threads along x cover a row's columns, VEC at a time (16-byte loads and stores
// when every row start is 16-byte aligned), blocks along y stride over rows; densely packed inputs are
// flattened to one long row first so short rows do not leave threads idle.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "activations.h"

namespace plm_engine {
namespace {

// fp32, fp16, bf16: the argument checks refuse other dtypes, so no kernels are built for them.
#define PLM_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int kThreads = 256;
constexpr float kSqrt2Inv = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK0 = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhK1 = 0.044715f;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

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
        const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
        for (int v = 0; v < VEC; ++v) in[j][v] = static_cast<float>(pk.v[v]);
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
        for (int v = 0; v < VEC; ++v) pk.v[v] = static_cast<T>(out[j][v]);
        *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
      } else {
        *p = static_cast<T>(out[j][0]);
      }
    }
  }
}

// Launches Op over (rows, n): inputs with unit last stride and any row stride, outputs contiguous.
template <typename Op>
void launch(std::initializer_list<const Tensor*> inputs, std::initializer_list<Tensor*> outputs, Op op) {
  const Tensor& first = **inputs.begin();
  int64_t rows = first.size(0), n = first.size(1);
  if (rows == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(first.device());
  bool packed = true;
  for (const Tensor* t : inputs) packed = packed && (rows == 1 || t->stride(0) == n);
  if (packed) n *= rows, rows = 1;
  PLM_DISPATCH_KERNEL_TYPES(first.scalar_type(), "eltwise_cuda", [&] {
    using T = scalar_t;
    constexpr int VEC = 16 / sizeof(T);
    EltArgs<T, Op::NIN, Op::NOUT> a;
    bool vec_ok = n % VEC == 0;
    int j = 0;
    for (const Tensor* t : inputs) {
      a.in[j] = t->const_data_ptr<T>();
      a.in_row_stride[j] = rows > 1 ? t->stride(0) : 0;
      vec_ok = vec_ok && a.in_row_stride[j] % VEC == 0 && reinterpret_cast<uintptr_t>(a.in[j]) % 16 == 0;
      ++j;
    }
    j = 0;
    for (Tensor* t : outputs) {
      a.out[j] = t->mutable_data_ptr<T>();
      vec_ok = vec_ok && reinterpret_cast<uintptr_t>(a.out[j]) % 16 == 0;
      ++j;
    }
    a.rows = rows, a.n = n;
    const int vec = vec_ok ? VEC : 1;
    const int64_t blocks_x = (n / vec + kThreads - 1) / kThreads;
    TORCH_CHECK(blocks_x <= INT32_MAX, "activation: row of ", n, " elements is too long");
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (vec_ok) {
      eltwise_kernel<T, VEC, Op><<<grid, kThreads, 0, stream>>>(a, op);
    } else {
      eltwise_kernel<T, 1, Op><<<grid, kThreads, 0, stream>>>(a, op);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor swiglu_fwd_cuda(const Tensor& gate, const Tensor& up) {
  check_activation_arg(gate, gate, "gate");
  check_activation_arg(up, gate, "up");
  Tensor y = at::empty(gate.sizes(), gate.options());
  launch({&gate, &up}, {&y}, SwigluFwd{});
  return y;
}

std::tuple<Tensor, Tensor> swiglu_bwd_cuda(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  check_activation_arg(gate, gate, "gate");
  check_activation_arg(up, gate, "up");
  check_activation_arg(dy, gate, "dy");
  Tensor dg = at::empty(gate.sizes(), gate.options());
  Tensor du = at::empty(gate.sizes(), gate.options());
  launch({&dy, &gate, &up}, {&dg, &du}, SwigluBwd{});
  return {dg, du};
}

Tensor gelu_fwd_cuda(const Tensor& x, const std::string& approximate) {
  check_activation_arg(x, x, "x");
  Tensor y = at::empty(x.sizes(), x.options());
  if (gelu_is_tanh(approximate)) {
    launch({&x}, {&y}, GeluFwd<true>{});
  } else {
    launch({&x}, {&y}, GeluFwd<false>{});
  }
  return y;
}

Tensor gelu_bwd_cuda(const Tensor& dy, const Tensor& x, const std::string& approximate) {
  check_activation_arg(x, x, "x");
  check_activation_arg(dy, x, "dy");
  Tensor dx = at::empty(x.sizes(), x.options());
  if (gelu_is_tanh(approximate)) {
    launch({&dy, &x}, {&dx}, GeluBwd<true>{});
  } else {
    launch({&dy, &x}, {&dx}, GeluBwd<false>{});
  }
  return dx;
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CUDA, m) {
  m.impl("swiglu_fwd", &plm_engine::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &plm_engine::swiglu_bwd_cuda);
  m.impl("gelu_fwd", &plm_engine::gelu_fwd_cuda);
  m.impl("gelu_bwd", &plm_engine::gelu_bwd_cuda);
}
