// Softmax forward / backward on CUDA (contract in softmax.h).
//
// One thread block per row. Pass 1: every thread keeps an online (max, sum of exp) over its strided
// columns; the pairs are merged across the warp with shuffles and across warps through shared
// memory. Pass 2 re-reads the row (from L2 for rows that were just read) and writes
// exp(v - max) / sum. Any row length works; fp32 math for every input dtype.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dispatch.h"
#include "cuda/softmax_kernels.cuh"
#include "softmax.h"

namespace plm_engine {
namespace {

Tensor softmax_fwd_cuda(const Tensor& x, double scale, bool causal) {
  check_softmax_fwd_args(x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1), sq = x.size(1), sk = x.size(2);
  if (y.numel() == 0) return y;
  TORCH_CHECK(rows <= 2147483647, "softmax: too many rows for one grid (", rows, ")");
  auto stream = at::cuda::getCurrentCUDAStream();
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "softmax_fwd_cuda", [&] {
    softmax_fwd_kernel<scalar_t><<<static_cast<unsigned>(rows), threads_for(sk), 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sq, sk, static_cast<float>(scale), causal);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

Tensor softmax_bwd_cuda(const Tensor& dy, const Tensor& y, double scale) {
  check_softmax_bwd_args(dy, y);
  const c10::cuda::CUDAGuard guard(y.device());
  Tensor dx = at::empty_like(y);
  const int64_t rows = y.size(0) * y.size(1), n = y.size(2);
  if (dx.numel() == 0) return dx;
  TORCH_CHECK(rows <= 2147483647, "softmax: too many rows for one grid (", rows, ")");
  auto stream = at::cuda::getCurrentCUDAStream();
  PLM_DISPATCH_FLOAT_TYPES(y.scalar_type(), "softmax_bwd_cuda", [&] {
    softmax_bwd_kernel<scalar_t><<<static_cast<unsigned>(rows), threads_for(n), 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n,
        static_cast<float>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CUDA, m) {
  m.impl("softmax_fwd", &plm_engine::softmax_fwd_cuda);
  m.impl("softmax_bwd", &plm_engine::softmax_bwd_cuda);
}
