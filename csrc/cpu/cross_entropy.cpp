// Fused cross-entropy on the CPU: loss and gradient per row, OpenMP over rows.
//
// The row kernel (ce_rows in cpu/softmax_kernels.inc, shared with softmax) is written once against the
// vector policy of simd.h and compiled for every instruction set; cpu_isa() picks the build once per
// task. Pass 1 reads the row once, takes the online (max, sum of exp) (and the plain sum, for label
// smoothing) over L1-sized column blocks and keeps the exponentials in a per-thread fp32 row buffer;
// pass 2 writes softmax - smoothing into dlogits, which may be the logits themselves (each element is
// read before it is written). One exp per element; each row is handled by one thread.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "cross_entropy.h"
#include "softmax.h"

namespace plm_engine {
namespace {

#define PLM_SIMD_KERNELS "cpu/softmax_kernels.inc"
#include "cpu/simd_instantiate.inc"

void check_targets(const Tensor& target, int64_t v, int64_t ignore_index) {
  const int64_t* tp = target.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < v), "target[", i, "] = ", tp[i],
                " is out of range for ", v, " classes (ignore_index is ", ignore_index, ")");
  }
}

Tensor run(const Tensor& logits, const Tensor& target, const Tensor& dlogits, int64_t ignore_index,
           double label_smoothing) {
  const int64_t n = logits.size(0), v = logits.size(1);
  check_targets(target, v, ignore_index);
  Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
  if (n == 0) return loss;
  PLM_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    // dlogits may alias logits: the row kernel reads every element before writing it.
    scalar_t* dxp = static_cast<scalar_t*>(dlogits.data_ptr());
    const int64_t* tp = target.const_data_ptr<int64_t>();
    float* lp = loss.mutable_data_ptr<float>();
    const float eps = static_cast<float>(label_smoothing);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      PLM_CPU_CALL(ce_rows<scalar_t>, xp, dxp, tp, lp, begin, end, v, ignore_index, eps);
    });
  });
  return loss;
}

std::tuple<Tensor, Tensor> cross_entropy_fwd_cpu(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                 double label_smoothing) {
  check_cross_entropy_args(logits, target);
  Tensor dlogits = at::empty_like(logits);
  Tensor loss = run(logits, target, dlogits, ignore_index, label_smoothing);
  return {loss, dlogits};
}

Tensor cross_entropy_fwd_inplace_cpu(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                     double label_smoothing) {
  check_cross_entropy_args(logits, target);
  return run(logits, target, logits, ignore_index, label_smoothing);
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("cross_entropy_fwd", &plm_engine::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &plm_engine::cross_entropy_fwd_inplace_cpu);
}
