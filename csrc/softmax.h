// Softmax (with scale and a bottom-right causal mask): the contract every device implements, the argument
// checks their entry points share (softmax_ops.cpp), and the causal-mask rule the CPU kernels (softmax
// and cross-entropy's shared cpu/softmax_kernels.inc) use. Kernels: cpu/softmax.cpp, cuda/softmax.cu.
//
// Contract (every device):
//   softmax_fwd(x, scale, causal) -> y
//     x: (batch, sq, sk) contiguous fp32/fp16/bf16. y = softmax(scale * x) over the last dim, x's dtype,
//     fp32 math. causal masks key j > i + (sk - sq) for query row i (bottom-right aligned). A row whose
//     unmasked entries are all -inf (or that has none) gives zeros, never NaN.
//   softmax_bwd(dy, y, scale) -> dx = scale * y * (dy - sum(dy * y)) over the last dim.
//     Masked and -inf positions have y = 0, so their gradient is 0 with no mask needed.
#pragma once
#include <torch/types.h>

#include <algorithm>
#include <cstdint>

namespace plm_engine {

using at::Tensor;

// Shapes, dtypes and contiguity: what the kernels index (plm_engine.ops.softmax checks the rest).
void check_softmax_fwd_args(const Tensor& x);
void check_softmax_bwd_args(const Tensor& dy, const Tensor& y);

// Number of keys query row i of a (sq, sk) causal score matrix may see: keys 0 .. i + sk - sq.
inline int64_t causal_keys(int64_t i, int64_t sq, int64_t sk) {
  return std::min<int64_t>(sk, std::max<int64_t>(0, i + sk - sq + 1));
}

}  // namespace plm_engine
