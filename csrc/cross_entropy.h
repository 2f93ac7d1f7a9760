// Fused cross-entropy: one pass over the logits gives each token's loss and its gradient.
//
// Contract (every device):
//   cross_entropy_fwd(logits, target, ignore_index, label_smoothing) -> (loss, dlogits)
//     logits: (N, V) contiguous fp32/fp16/bf16; target: (N,) int64 class indices in [0, V) or
//     ignore_index. With eps = label_smoothing and lse = logsumexp(logits[i]) (fp32 math):
//       loss[i]       = lse - (1 - eps) * x[i, t] - eps / V * sum_j x[i, j]       (fp32, (N,))
//       dlogits[i, j] = softmax(x[i])_j - (1 - eps) * [j == t] - eps / V           (logits' dtype)
//     i.e. the gradient of loss[i] alone; the caller scales it by dL/dloss[i] (the reduction's
//     1 / n_valid and the upstream gradient). Ignored rows get loss 0 and a zero gradient row.
//   cross_entropy_fwd_inplace(logits!, target, ignore_index, label_smoothing) -> loss
//     the same, writing dlogits over the logits (each row is read before it is overwritten), so no
//     second (N, V) buffer exists.
// The CPU entry points reject targets outside [0, V) (other than ignore_index) before any work.
// Kernels: cpu/cross_entropy.cpp (CPU).
#pragma once
#include <torch/types.h>

namespace plm_engine {

using at::Tensor;

// Shapes, dtypes, devices and contiguity: what the kernels index (plm_engine.ops.cross_entropy checks the
// rest). The CPU kernels also check the target values, which they read anyway.
void check_cross_entropy_args(const Tensor& logits, const Tensor& target);

}  // namespace plm_engine
