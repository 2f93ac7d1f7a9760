// Schemas, argument checks and CPU registration of the fused cross-entropy (contract in cross_entropy.h).
#include <torch/library.h>

#include "common/checks.h"
#include "cross_entropy.h"

namespace plm_engine {

void check_cross_entropy_args(const Tensor& logits, const Tensor& target, double label_smoothing) {
  PLM_CHECK_DIM(logits, 2);
  PLM_CHECK_FLOAT(logits);
  PLM_CHECK_CONTIGUOUS(logits);
  TORCH_CHECK(logits.size(1) > 0, "logits must have at least one class, got shape ", logits.sizes());
  PLM_CHECK_DIM(target, 1);
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.size(0) == logits.size(0), "target has ", target.size(0), " entries but logits has ",
              logits.size(0), " rows");
  PLM_CHECK_SAME_DEVICE(target, logits);
  PLM_CHECK_CONTIGUOUS(target);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing)"
        " -> (Tensor, Tensor)");
  m.def("cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, int ignore_index, float label_smoothing)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("cross_entropy_fwd", &plm_engine::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &plm_engine::cross_entropy_fwd_inplace_cpu);
}
