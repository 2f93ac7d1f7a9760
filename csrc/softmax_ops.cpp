// Schemas, argument checks and CPU registration of the softmax family (see softmax.h for the contract).
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "softmax.h"

namespace plm_engine {

void check_softmax_fwd_args(const Tensor& x, double scale) {
  PLM_CHECK_DIM(x, 3);
  PLM_CHECK_FLOAT(x);
  PLM_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be a finite positive number, got ", scale);
}

void check_softmax_bwd_args(const Tensor& dy, const Tensor& y, double scale) {
  PLM_CHECK_DIM(y, 3);
  PLM_CHECK_FLOAT(y);
  PLM_CHECK_CONTIGUOUS(y);
  PLM_CHECK_SHAPE(dy, y);
  PLM_CHECK_SAME_DTYPE(dy, y);
  PLM_CHECK_SAME_DEVICE(dy, y);
  PLM_CHECK_CONTIGUOUS(dy);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be a finite positive number, got ", scale);
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("softmax_fwd(Tensor x, float scale, bool causal) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("softmax_fwd", &plm_engine::softmax_fwd_cpu);
  m.impl("softmax_bwd", &plm_engine::softmax_bwd_cpu);
}
