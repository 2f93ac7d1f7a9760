// Fused activations (SwiGLU, GELU): the contract every device implements, and the argument checks their
// entry points share (activation_ops.cpp). Kernels: cpu/activations.cpp (CPU), cuda/activations.cu (CUDA).
//
// Every tensor argument is 2-D (rows, n) with a unit last stride and any row stride, so the two halves
// of a fused gate_up projection can be passed as views without a copy; all share one shape, dtype
// (fp32, fp16, bf16) and device. Outputs are new contiguous (rows, n) tensors. Math is fp32.
//   swiglu_fwd(gate, up)          y = silu(gate) * up
//   swiglu_bwd(dy, gate, up)      (dgate, dup)
//   gelu_fwd(x, approximate)      y = x * Phi(x), Phi exact (erf) for "none", tanh form for "tanh"
//   gelu_bwd(dy, x, approximate)  dx
#pragma once
#include <torch/types.h>

#include <initializer_list>
#include <utility>

namespace plm_engine {

using at::Tensor;

// Every tensor 2-D, of the first one's shape, dtype (fp32, fp16, bf16) and device, with a unit last
// stride: what the kernels index (plm_engine.ops.activations checks the rest).
void check_activation_args(std::initializer_list<std::pair<const char*, const Tensor*>> named);

}  // namespace plm_engine
