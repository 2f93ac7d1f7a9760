// Softmax (with scale and a bottom-right causal mask): kernel entry points, argument checks, and the
// vectorisable fp32 helpers the CPU softmax and cross-entropy kernels share.
//
// Contract (every device):
//   softmax_fwd(x, scale, causal) -> y
//     x: (batch, sq, sk) contiguous fp32/fp16/bf16. y = softmax(scale * x) over the last dim, x's dtype,
//     fp32 math. causal masks key j > i + (sk - sq) for query row i (bottom-right aligned). A row whose
//     unmasked entries are all -inf (or that has none) gives zeros, never NaN.
//   softmax_bwd(dy, y, scale) -> dx = scale * y * (dy - sum(dy * y)) over the last dim.
//     Masked and -inf positions have y = 0, so their gradient is 0 with no mask needed.
#pragma once
#include <ATen/Dispatch.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>

#include "common/dispatch.h"

namespace plm_engine {

using at::Tensor;

Tensor softmax_fwd_cpu(const Tensor& x, double scale, bool causal);
Tensor softmax_bwd_cpu(const Tensor& dy, const Tensor& y, double scale);
#ifdef PLM_ENGINE_WITH_CUDA
Tensor softmax_fwd_cuda(const Tensor& x, double scale, bool causal);
Tensor softmax_bwd_cuda(const Tensor& dy, const Tensor& y, double scale);
#endif

// Shared validation (softmax_ops.cpp), used by both devices.
void check_softmax_fwd_args(const Tensor& x, double scale);
void check_softmax_bwd_args(const Tensor& dy, const Tensor& y, double scale);

// Number of keys query row i of a (sq, sk) causal score matrix may see: keys 0 .. i + sk - sq.
inline int64_t causal_keys(int64_t i, int64_t sq, int64_t sk) {
  return std::min<int64_t>(sk, std::max<int64_t>(0, i + sk - sq + 1));
}

}  // namespace plm_engine
