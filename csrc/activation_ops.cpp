// The activation family's schemas and the argument checks its CPU and CUDA entry points share
// (contract in activations.h).
#include <torch/library.h>

#include "activations.h"
#include "common/checks.h"

namespace plm_engine {

void check_activation_args(std::initializer_list<std::pair<const char*, const Tensor*>> named) {
  const Tensor& like = *named.begin()->second;
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->dim() == 2, name, " must have 2 dims (rows, n), got ", t->dim());
    PLM_CHECK_FLOAT((*t));
    TORCH_CHECK(t->scalar_type() == like.scalar_type(), name, " is ", t->scalar_type(), " but expected ",
                like.scalar_type());
    TORCH_CHECK(t->sizes() == like.sizes(), name, " has shape ", t->sizes(), " but expected ", like.sizes());
    TORCH_CHECK(t->device() == like.device(), name, " is on ", t->device(), " but expected ", like.device());
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, name, " must be contiguous in its last dim, got strides ",
                t->strides());
  }
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("gelu_fwd(Tensor x, str approximate) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x, str approximate) -> Tensor");
}
