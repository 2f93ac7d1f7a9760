// Declarations of every kernel entry point in _C, grouped by op family. bindings.cpp registers them.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>

namespace plm_engine {

using at::Tensor;

// ---- norms (LayerNorm / RMSNorm, optional fused residual add) -------------------------------------
// x, residual: (rows, n) contiguous; weight, bias: (n,). Returns
//   y    (rows, n)  norm(h) * weight + bias, dtype of x
//   h    (rows, n)  x + residual in x's dtype, or an empty tensor when residual is None
//   mean (rows,)    fp32; empty for RMSNorm
//   rstd (rows,)    fp32, 1 / sqrt(var + eps) (LayerNorm) or 1 / sqrt(mean(h^2) + eps) (RMSNorm)
// weight/bias may be x's dtype or fp32 (fp32 master weights under autocast).
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                        const std::optional<Tensor>& bias,
                                                        const std::optional<Tensor>& residual, double eps,
                                                        bool is_rms);
// dy: (rows, n); dh: optional gradient flowing into the h output; h: the normalised input (x, or x +
// residual). Returns dx (x's dtype; also the residual's gradient), dweight and dbias (weight's dtype;
// dbias empty when has_bias is false).
std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy, const std::optional<Tensor>& dh,
                                                const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                const Tensor& rstd, bool has_bias, bool is_rms);
#ifdef PLM_ENGINE_WITH_CUDA
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                         const std::optional<Tensor>& bias,
                                                         const std::optional<Tensor>& residual, double eps,
                                                         bool is_rms);
std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(const Tensor& dy, const std::optional<Tensor>& dh,
                                                 const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                 const Tensor& rstd, bool has_bias, bool is_rms);
#endif

// Shared validation of the norm arguments (norm_checks.cpp), used by both devices.
void check_norm_fwd_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& residual, double eps);
void check_norm_bwd_args(const Tensor& dy, const std::optional<Tensor>& dh, const Tensor& h,
                         const Tensor& weight, const Tensor& mean, const Tensor& rstd, bool is_rms);

}  // namespace plm_engine
