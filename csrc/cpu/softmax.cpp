// Softmax forward / backward on the CPU.
//
// OpenMP over rows; within a row, pass 1 takes the online (max, sum of exp) over L1-sized column blocks
// (softmax.h) and pass 2 writes exp(v - max) / sum, so any row length works with one fp32 block of
// scratch and the input is read twice, written once. Row kernels are compiled for AVX-512, AVX2 and
// baseline x86-64 (target_clones picks at load time), since the extension is built without -march.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/checks.h"
#include "softmax.h"

namespace plm_engine {
namespace {

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_fwd_row(const T* x, T* y, int64_t n,
                                                                                  int64_t valid, float scale,
                                                                                  float* buf) {
  const auto [m, s] = cpu::row_max_sumexp(x, valid, scale, buf);
  // s == 0 exactly when every visible entry is -inf (or none is visible): the row is all zeros.
  const float inv = s > 0.f ? 1.f / s : 0.f;
  const float shift = s > 0.f ? m : 0.f;
#pragma omp simd
  for (int64_t i = 0; i < valid; ++i) y[i] = cpu::from_f32<T>(cpu::exp_approx(cpu::to_f32(x[i]) * scale - shift) * inv);
  for (int64_t i = valid; i < n; ++i) y[i] = static_cast<T>(0.f);
}

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_bwd_row(const T* dy, const T* y, T* dx,
                                                                                  int64_t n, float scale) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) dot += cpu::to_f32(dy[i]) * cpu::to_f32(y[i]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    dx[i] = cpu::from_f32<T>(scale * cpu::to_f32(y[i]) * (cpu::to_f32(dy[i]) - dot));
}

}  // namespace

Tensor softmax_fwd_cpu(const Tensor& x, double scale, bool causal) {
  check_softmax_fwd_args(x, scale);
  const int64_t batch = x.size(0), sq = x.size(1), sk = x.size(2);
  Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * sq, 1, [&](int64_t begin, int64_t end) {
      float buf[cpu::kBlock];
      for (int64_t r = begin; r < end; ++r) {
        const int64_t valid = causal ? causal_keys(r % sq, sq, sk) : sk;
        softmax_fwd_row<scalar_t>(xp + r * sk, yp + r * sk, sk, valid, static_cast<float>(scale), buf);
      }
    });
  });
  return y;
}

Tensor softmax_bwd_cpu(const Tensor& dy, const Tensor& y, double scale) {
  check_softmax_bwd_args(dy, y, scale);
  const int64_t rows = y.size(0) * y.size(1), n = y.size(2);
  Tensor dx = at::empty_like(y);
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_bwd_cpu", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* ypp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        softmax_bwd_row<scalar_t>(dyp + r * n, ypp + r * n, dxp + r * n, n, static_cast<float>(scale));
    });
  });
  return dx;
}

}  // namespace plm_engine
