// Fused activations (SwiGLU, GELU): declarations shared by activation_ops.cpp (schemas, checks, CPU
// registration), cpu/activations.cpp and cuda/activations.cu.
//
// Every tensor argument is 2-D (rows, n) with a unit last stride and any row stride, so the two halves
// of a fused gate_up projection can be passed as views without a copy; all share one shape, dtype
// (fp32, fp16, bf16) and device. Outputs are new contiguous (rows, n) tensors. Math is fp32.
//   swiglu_fwd(gate, up)          y = silu(gate) * up
//   swiglu_bwd(dy, gate, up)      (dgate, dup)
//   gelu_fwd(x, approximate)      y = x * Phi(x), Phi exact (erf) for "none", tanh form for "tanh"
//   gelu_bwd(dy, x, approximate)  dx
#pragma once
#include <ATen/Dispatch.h>
#include <torch/types.h>

#include <string>
#include <tuple>

#include "common/dispatch.h"

namespace plm_engine {

using at::Tensor;

void check_activation_arg(const Tensor& t, const Tensor& like, const char* name);
// true for "tanh", false for "none"; anything else is an error.
bool gelu_is_tanh(const std::string& approximate);

Tensor swiglu_fwd_cpu(const Tensor& gate, const Tensor& up);
std::tuple<Tensor, Tensor> swiglu_bwd_cpu(const Tensor& dy, const Tensor& gate, const Tensor& up);
Tensor gelu_fwd_cpu(const Tensor& x, const std::string& approximate);
Tensor gelu_bwd_cpu(const Tensor& dy, const Tensor& x, const std::string& approximate);

}  // namespace plm_engine

