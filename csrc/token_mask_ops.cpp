// The token-mask family's schema and the argument checks of its entry point (contract in token_mask.h).
#include <torch/library.h>

#include "common/checks.h"
#include "token_mask.h"

namespace plm_engine {

void check_token_bitmask_args(const Tensor& logits, const Tensor& bitmask, const std::optional<Tensor>& rows) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (n, vocab), got shape ", logits.sizes());
  PLM_CHECK_FLOAT(logits);
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, "logits must be contiguous in its last dim, got strides ",
              logits.strides());
  const int64_t words = (logits.size(1) + 31) / 32;
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.size(1) == words,
              "bitmask must be int32 (m, ", words, ") for a vocabulary of ", logits.size(1), ", got ",
              bitmask.scalar_type(), " ", bitmask.sizes());
  TORCH_CHECK(bitmask.size(1) <= 1 || bitmask.stride(1) == 1, "bitmask must be contiguous in its last dim, got strides ",
              bitmask.strides());
  PLM_CHECK_SAME_DEVICE(bitmask, logits);
  if (rows.has_value()) {
    const Tensor& r = *rows;
    TORCH_CHECK((r.scalar_type() == at::kInt || r.scalar_type() == at::kLong) && r.dim() == 1 &&
                    r.size(0) == bitmask.size(0),
                "rows must be (", bitmask.size(0), ",) int32/int64, one per bitmask row, got ", r.scalar_type(), " ",
                r.sizes());
    PLM_CHECK_SAME_DEVICE(r, logits);
  } else {
    TORCH_CHECK(bitmask.size(0) == logits.size(0), "without rows, bitmask needs one row per logits row (",
                logits.size(0), "), got ", bitmask.size(0));
  }
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor bitmask, Tensor? rows) -> ()");
}
