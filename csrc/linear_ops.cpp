// The linear family's schemas and the argument checks of its entry point (contract in linear.h).
#include <torch/library.h>

#include "linear.h"

namespace plm_engine {

void check_linear_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "linear: x must have 2 dims (M, K), got ", x.dim());
  TORCH_CHECK(weight.dim() == 2, "linear: weight must have 2 dims (N, K), got ", weight.dim());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "linear: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "linear: weight is ", weight.scalar_type(), " but x is ", dt);
  TORCH_CHECK(weight.size(1) == x.size(1), "linear: weight has shape ", weight.sizes(), " but x has K = ",
              x.size(1), " features");
  TORCH_CHECK(weight.device() == x.device(), "linear: weight is on ", weight.device(), " but x is on ",
              x.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear: bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, "linear: bias is ", bias->scalar_type(), " but x is ", dt);
    TORCH_CHECK(bias->device() == x.device(), "linear: bias is on ", bias->device(), " but x is on ", x.device());
  }
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // No tensor argument, so no device to dispatch on: defined with its one implementation.
  m.def("linear_cpu_isa() -> str", &plm_engine::linear_cpu_isa);
}
