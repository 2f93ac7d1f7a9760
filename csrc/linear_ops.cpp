// Linear op schema, argument checks and CPU registration; the kernel is in cpu/linear.cpp. There is no
// CUDA kernel: on GPUs plm_engine.ops.linear calls F.linear (cuBLAS). Fake impl and autograd come from
// plm_engine/ops/linear.py.
//   linear_fwd(x, weight, bias) -> y   x (M, K), weight (N, K), bias (N,) or None; y (M, N) = x @ W^T + b
//                                      in x's dtype (fp32, fp16 or bf16, all inputs alike), fp32 math
//   linear_cpu_isa() -> str            the instruction set the CPU kernel runs with now (cpu::cpu_isa(),
//                                      followed at run time): "avx512_bf16" | "avx512" | "avx2" |
//                                      "generic" ("neon" on aarch64)
#include <torch/library.h>

#include <optional>
#include <string>

namespace plm_engine {

using at::Tensor;

// cpu/linear.cpp
Tensor linear_fwd_cpu_impl(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias);
std::string linear_cpu_isa();

namespace {

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

Tensor linear_fwd_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_linear_args(x, weight, bias);
  return linear_fwd_cpu_impl(x, weight, bias);
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_cpu_isa() -> str", &plm_engine::linear_cpu_isa);
}

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) { m.impl("linear_fwd", &plm_engine::linear_fwd_cpu); }
