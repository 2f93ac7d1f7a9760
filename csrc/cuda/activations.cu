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
#include "common/dispatch.h"
#include "cuda/activations_kernels.cuh"

namespace plm_engine {
namespace {

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
  PLM_DISPATCH_FLOAT_TYPES(first.scalar_type(), "eltwise_cuda", [&] {
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
  check_activation_args({{"gate", &gate}, {"up", &up}});
  Tensor y = at::empty(gate.sizes(), gate.options());
  launch({&gate, &up}, {&y}, SwigluFwd{});
  return y;
}

std::tuple<Tensor, Tensor> swiglu_bwd_cuda(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  check_activation_args({{"gate", &gate}, {"up", &up}, {"dy", &dy}});
  Tensor dg = at::empty(gate.sizes(), gate.options());
  Tensor du = at::empty(gate.sizes(), gate.options());
  launch({&dy, &gate, &up}, {&dg, &du}, SwigluBwd{});
  return {dg, du};
}

Tensor gelu_fwd_cuda(const Tensor& x, const std::string& approximate) {
  check_activation_args({{"x", &x}});
  Tensor y = at::empty(x.sizes(), x.options());
  if (approximate == "tanh") {
    launch({&x}, {&y}, GeluFwd<true>{});
  } else {
    launch({&x}, {&y}, GeluFwd<false>{});
  }
  return y;
}

Tensor gelu_bwd_cuda(const Tensor& dy, const Tensor& x, const std::string& approximate) {
  check_activation_args({{"x", &x}, {"dy", &dy}});
  Tensor dx = at::empty(x.sizes(), x.options());
  if (approximate == "tanh") {
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
