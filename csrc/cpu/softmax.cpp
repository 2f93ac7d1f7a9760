// Softmax forward / backward on the CPU.
//
// OpenMP over rows (at::parallel_for); the row kernels (cpu/softmax_kernels.inc) are written once
// against the vector policy of simd.h and compiled for every instruction set; cpu_isa() picks the build
// once per task. The forward reads each row once, keeps its exponentials in a per-thread fp32 buffer and
// writes the row once. Every row's arithmetic stays inside one thread, in a fixed order: results do not
// depend on the thread count.
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
#include "softmax.h"

namespace plm_engine {
namespace {

#define PLM_SIMD_KERNELS "cpu/softmax_kernels.inc"
#include "cpu/simd_instantiate.inc"

Tensor softmax_fwd_cpu(const Tensor& x, double scale, bool causal) {
  check_softmax_fwd_args(x);
  const int64_t batch = x.size(0), sq = x.size(1), sk = x.size(2);
  Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "softmax_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const float sc = static_cast<float>(scale);
    at::parallel_for(0, batch * sq, 1, [&](int64_t begin, int64_t end) {
      PLM_CPU_CALL(softmax_fwd_rows<scalar_t>, xp, yp, begin, end, sq, sk, causal, sc);
    });
  });
  return y;
}

Tensor softmax_bwd_cpu(const Tensor& dy, const Tensor& y, double scale) {
  check_softmax_bwd_args(dy, y);
  const int64_t rows = y.size(0) * y.size(1), n = y.size(2);
  Tensor dx = at::empty_like(y);
  if (dx.numel() == 0) return dx;
  PLM_DISPATCH_FLOAT_TYPES(y.scalar_type(), "softmax_bwd_cpu", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* ypp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const float sc = static_cast<float>(scale);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      PLM_CPU_CALL(softmax_bwd_rows<scalar_t>, dyp, ypp, dxp, begin, end, n, sc);
    });
  });
  return dx;
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("softmax_fwd", &plm_engine::softmax_fwd_cpu);
  m.impl("softmax_bwd", &plm_engine::softmax_bwd_cpu);
}
