// SwiGLU / GELU op schemas, argument checks and CPU registration. The CUDA kernels register
// themselves in cuda/activations.cu; fake impls and autograd come from plm_engine/ops/activations.py.
#include <torch/library.h>

#include "activations.h"
#include "common/checks.h"

namespace plm_engine {

void check_activation_arg(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must have 2 dims (rows, n), got ", t.dim());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " is ", t.scalar_type(), " but expected ",
              like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), " but expected ", like.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but expected ", like.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must be contiguous in its last dim, got strides ",
              t.strides());
}

bool gelu_is_tanh(const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "approximate must be 'none' or 'tanh', got '",
              approximate, "'");
  return approximate == "tanh";
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("gelu_fwd(Tensor x, str approximate) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x, str approximate) -> Tensor");
}

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("swiglu_fwd", &plm_engine::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &plm_engine::swiglu_bwd_cpu);
  m.impl("gelu_fwd", &plm_engine::gelu_fwd_cpu);
  m.impl("gelu_bwd", &plm_engine::gelu_bwd_cpu);
}
