// The norm family's schemas and the argument checks its CPU and CUDA entry points share (contract in
// norms.h). The checks cover what the kernels index; plm_engine.ops.norms checks the rest once.
#include <torch/library.h>

#include "common/checks.h"
#include "norms.h"

namespace plm_engine {

static void check_weight_like(const Tensor& w, const Tensor& x, const char* name) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), name, " must have shape (", x.size(1), "), got ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), name, " is on ", w.device(), " but x is on ", x.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat, name,
              " must be float32 or x's dtype (", x.scalar_type(), "), got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), name, " must be contiguous");
}

void check_norm_fwd_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& residual) {
  PLM_CHECK_DIM(x, 2);
  PLM_CHECK_FLOAT(x);
  PLM_CHECK_CONTIGUOUS(x);
  check_weight_like(weight, x, "weight");
  if (bias.has_value()) check_weight_like(*bias, x, "bias");
  if (bias.has_value()) PLM_CHECK_SAME_DTYPE(weight, (*bias));
  if (residual.has_value()) {
    const Tensor& r = *residual;
    PLM_CHECK_SHAPE(r, x);
    PLM_CHECK_SAME_DTYPE(r, x);
    PLM_CHECK_SAME_DEVICE(r, x);
    PLM_CHECK_CONTIGUOUS(r);
  }
}

void check_norm_bwd_args(const Tensor& dy, const std::optional<Tensor>& dh, const Tensor& h,
                         const Tensor& weight, const Tensor& mean, const Tensor& rstd, bool is_rms) {
  PLM_CHECK_DIM(h, 2);
  PLM_CHECK_FLOAT(h);
  PLM_CHECK_CONTIGUOUS(h);
  PLM_CHECK_SHAPE(dy, h);
  PLM_CHECK_SAME_DTYPE(dy, h);
  PLM_CHECK_SAME_DEVICE(dy, h);
  PLM_CHECK_CONTIGUOUS(dy);
  if (dh.has_value()) {
    PLM_CHECK_SHAPE((*dh), h);
    PLM_CHECK_SAME_DTYPE((*dh), h);
    PLM_CHECK_SAME_DEVICE((*dh), h);
    PLM_CHECK_CONTIGUOUS((*dh));
  }
  check_weight_like(weight, h, "weight");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == h.size(0) && rstd.scalar_type() == at::kFloat,
              "rstd must be float32 of shape (", h.size(0), "), got ", rstd.scalar_type(), " ", rstd.sizes());
  PLM_CHECK_SAME_DEVICE(rstd, h);
  if (!is_rms) {
    TORCH_CHECK(mean.dim() == 1 && mean.size(0) == h.size(0) && mean.scalar_type() == at::kFloat,
                "mean must be float32 of shape (", h.size(0), "), got ", mean.scalar_type(), " ", mean.sizes());
    PLM_CHECK_SAME_DEVICE(mean, h);
  }
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("norm_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps, bool is_rms)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor mean, Tensor rstd,"
        " bool has_bias, bool is_rms) -> (Tensor, Tensor, Tensor)");
}
