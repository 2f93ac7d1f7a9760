// The softmax family's schemas and the argument checks its CPU and CUDA entry points share (contract in
// softmax.h).
#include <torch/library.h>

#include "common/checks.h"
#include "softmax.h"

namespace plm_engine {

void check_softmax_fwd_args(const Tensor& x) {
  PLM_CHECK_DIM(x, 3);
  PLM_CHECK_FLOAT(x);
  PLM_CHECK_CONTIGUOUS(x);
}

void check_softmax_bwd_args(const Tensor& dy, const Tensor& y) {
  PLM_CHECK_DIM(y, 3);
  PLM_CHECK_FLOAT(y);
  PLM_CHECK_CONTIGUOUS(y);
  PLM_CHECK_SHAPE(dy, y);
  PLM_CHECK_SAME_DTYPE(dy, y);
  PLM_CHECK_SAME_DEVICE(dy, y);
  PLM_CHECK_CONTIGUOUS(dy);
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("softmax_fwd(Tensor x, float scale, bool causal) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale) -> Tensor");
}
