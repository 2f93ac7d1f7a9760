// The linear family's schemas and the argument checks of its entry point (contract in linear.h).
#include <torch/library.h>

#include "linear.h"

namespace plm_engine {

namespace {

// x (M, K) of a kernel dtype, and an optional bias (n,) like x: what both linear ops index.
void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must have 2 dims (M, K), got ", x.dim());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
}

void check_bias(const std::optional<Tensor>& bias, int64_t n, const Tensor& x, const char* op) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape (", n, ",), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias is ", bias->scalar_type(), " but x is ",
              x.scalar_type());
  TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
}

}  // namespace

void check_linear_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_x(x, "linear");
  TORCH_CHECK(weight.dim() == 2, "linear: weight must have 2 dims (N, K), got ", weight.dim());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "linear: weight is ", weight.scalar_type(), " but x is ",
              x.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), "linear: weight has shape ", weight.sizes(), " but x has K = ",
              x.size(1), " features");
  TORCH_CHECK(weight.device() == x.device(), "linear: weight is on ", weight.device(), " but x is on ",
              x.device());
  check_bias(bias, weight.size(0), x, "linear");
}

void check_linear_q_args(const Tensor& x, const Tensor& qweight, int64_t qtype, const std::optional<Tensor>& bias) {
  check_x(x, "linear_q");
  const QBlock blk = q_block(qtype);
  TORCH_CHECK(blk.values > 0, "linear_q: unsupported GGUF type id ", qtype,
              " (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14)");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte,
              "linear_q: qweight must be a 2-dim uint8 tensor (N, row_bytes), got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t K = x.size(1);
  TORCH_CHECK(K % blk.values == 0, "linear_q: K = ", K, " is not a multiple of the type's block of ", blk.values,
              " values");
  TORCH_CHECK(qweight.size(1) == K / blk.values * blk.bytes, "linear_q: qweight rows hold ", qweight.size(1),
              " bytes, but K = ", K, " values of this type take ", K / blk.values * blk.bytes);
  TORCH_CHECK(qweight.device() == x.device(), "linear_q: qweight is on ", qweight.device(), " but x is on ",
              x.device());
  check_bias(bias, qweight.size(0), x, "linear_q");
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_q_fwd(Tensor x, Tensor qweight, int qtype, Tensor? bias) -> Tensor");
  // No tensor argument, so no device to dispatch on: defined with its one implementation.
  m.def("linear_cpu_isa() -> str", &plm_engine::linear_cpu_isa);
}
