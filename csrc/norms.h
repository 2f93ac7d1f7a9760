// LayerNorm / RMSNorm with the pre-norm block's fused residual add: the contract every device
// implements, and the argument checks their entry points share (norm_ops.cpp).
//
//   norm_fwd(x, weight, bias?, residual?, eps, is_rms) -> (y, h, mean, rstd)
//     x, residual: (rows, n) contiguous; weight, bias: (n,) in x's dtype or fp32 (fp32 master weights
//     under autocast). Returns
//       y    (rows, n)  norm(h) * weight + bias, dtype of x
//       h    (rows, n)  x + residual in x's dtype, or an empty tensor when residual is None
//       mean (rows,)    fp32; empty for RMSNorm
//       rstd (rows,)    fp32, 1 / sqrt(var + eps) (LayerNorm) or 1 / sqrt(mean(h^2) + eps) (RMSNorm)
//   norm_bwd(dy, dh?, h, weight, mean, rstd, has_bias, is_rms) -> (dx, dweight, dbias)
//     dy: (rows, n); dh: optional gradient flowing into the h output; h: the normalised input (x, or
//     x + residual). dx in x's dtype (also the residual's gradient), dweight and dbias in weight's dtype
//     (dbias empty when has_bias is false).
// Kernels: cpu/norms.cpp (CPU), cuda/norms.cu (CUDA).
#pragma once
#include <torch/types.h>

#include <optional>

namespace plm_engine {

using at::Tensor;

// Shapes, dtypes, devices and contiguity: what the kernels index (plm_engine.ops.norms checks the rest).
void check_norm_fwd_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& residual);
void check_norm_bwd_args(const Tensor& dy, const std::optional<Tensor>& dh, const Tensor& h,
                         const Tensor& weight, const Tensor& mean, const Tensor& rstd, bool is_rms);

}  // namespace plm_engine
