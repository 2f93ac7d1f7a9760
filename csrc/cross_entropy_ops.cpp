// The cross-entropy family's schemas and the argument checks of its entry points (contract in
// cross_entropy.h).
#include <torch/library.h>

#include "common/checks.h"
#include "cross_entropy.h"

namespace plm_engine {

void check_cross_entropy_args(const Tensor& logits, const Tensor& target) {
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
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing)"
        " -> (Tensor, Tensor)");
  m.def("cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, int ignore_index, float label_smoothing)"
        " -> Tensor");
}
