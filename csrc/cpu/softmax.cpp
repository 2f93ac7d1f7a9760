// Softmax forward / backward on the CPU.
//
// OpenMP over rows. Two builds of the row kernels, chosen at run time (cpu::avx512_enabled()):
//  - AVX-512 intrinsics (cpu/simd512.h): pass 1 reads the row once, takes the online (max, sum of exp)
//    over L1-sized blocks and keeps the exponentials in a per-thread fp32 row buffer; pass 2 rescales
//    them per block and writes y. One exp per element, x read once, y written once.
//  - portable loops (softmax.h) the compiler vectorises, compiled for AVX-512, AVX2 and baseline x86-64
//    by target_clones: pass 2 re-reads x and recomputes the exp, so scratch is one block.
// Both keep every row's arithmetic inside one thread: results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "cpu/simd512.h"
#include "softmax.h"

namespace plm_engine {
namespace {

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_fwd_row(const T* x, T* y, int64_t n,
                                                                                  int64_t valid, float scale,
                                                                                  float* buf) {
  const auto [m, s] = cpu::row_max_sumexp(x, valid, scale, buf);
  // s == 0 exactly when every visible entry is -inf (or none is visible): the row is all zeros. A NaN
  // in the row makes s NaN, and the row NaN.
  const float inv = s > 0.f ? 1.f / s : (s == s ? 0.f : s);
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

#ifdef PLM_CPU_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same false positive, reported from the caller
namespace v512k {
using namespace cpu::v512;

// e: >= valid floats, bm: >= valid / kBlock + 1 floats of per-thread scratch.
template <typename T>
void softmax_fwd_row(const T* x, T* y, int64_t n, int64_t valid, float scale, float* e, float* bm) {
  const RowExp r = row_exp(x, valid, scale, e, bm, nullptr);
  if (r.nan) {
    const V q = set1(std::numeric_limits<float>::quiet_NaN());
    for (int64_t i = 0; i < n; i += W) store(y + i, q, first(n - i));
    return;
  }
  // s == 0 exactly when every visible entry is -inf (or none is visible): the row is all zeros.
  const float inv = r.s > 0.f ? 1.f / r.s : 0.f;
  for (int64_t b0 = 0, blk = 0; b0 < valid; b0 += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, valid - b0);
    const V f = set1(block_factor(bm[blk], r.m, inv));
    for (int64_t i = 0; i < len; i += W) {
      const M k = first(len - i);
      store(y + b0 + i, _mm512_mul_ps(load(e + b0 + i, k), f), k);
    }
  }
  for (int64_t i = valid; i < n; i += W) store(y + i, zero(), first(n - i));
}

template <typename T>
void softmax_bwd_row(const T* dy, const T* y, T* dx, int64_t n, float scale) {
  // Four accumulators hide the FMA latency; the fixed lane order keeps the result deterministic.
  V a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = _mm512_fmadd_ps(load(dy + i), load(y + i), a0);
    a1 = _mm512_fmadd_ps(load(dy + i + W), load(y + i + W), a1);
    a2 = _mm512_fmadd_ps(load(dy + i + 2 * W), load(y + i + 2 * W), a2);
    a3 = _mm512_fmadd_ps(load(dy + i + 3 * W), load(y + i + 3 * W), a3);
  }
  for (; i < n; i += W) {
    const M k = first(n - i);
    a0 = _mm512_fmadd_ps(load(dy + i, k), load(y + i, k), a0);
  }
  const V dot = set1(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
  const V vs = set1(scale);
  for (i = 0; i < n; i += W) {
    const M k = first(n - i);
    const V yv = load(y + i, k);
    store(dx + i, _mm512_mul_ps(_mm512_mul_ps(vs, yv), _mm512_sub_ps(load(dy + i, k), dot)), k);
  }
}

}  // namespace v512k
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_CPU_AVX512

Tensor softmax_fwd_cpu(const Tensor& x, double scale, bool causal) {
  check_softmax_fwd_args(x, scale);
  const int64_t batch = x.size(0), sq = x.size(1), sk = x.size(2);
  Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "softmax_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const float sc = static_cast<float>(scale);
#ifdef PLM_CPU_AVX512
    if (cpu::avx512_enabled()) {
      at::parallel_for(0, batch * sq, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> e(sk), bm(sk / cpu::v512::kBlock + 1);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t valid = causal ? causal_keys(r % sq, sq, sk) : sk;
          v512k::softmax_fwd_row<scalar_t>(xp + r * sk, yp + r * sk, sk, valid, sc, e.data(), bm.data());
        }
      });
      return;
    }
#endif
    at::parallel_for(0, batch * sq, 1, [&](int64_t begin, int64_t end) {
      float buf[cpu::kBlock];
      for (int64_t r = begin; r < end; ++r) {
        const int64_t valid = causal ? causal_keys(r % sq, sq, sk) : sk;
        softmax_fwd_row<scalar_t>(xp + r * sk, yp + r * sk, sk, valid, sc, buf);
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
  PLM_DISPATCH_FLOAT_TYPES(y.scalar_type(), "softmax_bwd_cpu", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* ypp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
#ifdef PLM_CPU_AVX512
    if (cpu::avx512_enabled()) {
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          v512k::softmax_bwd_row<scalar_t>(dyp + r * n, ypp + r * n, dxp + r * n, n, static_cast<float>(scale));
      });
      return;
    }
#endif
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        softmax_bwd_row<scalar_t>(dyp + r * n, ypp + r * n, dxp + r * n, n, static_cast<float>(scale));
    });
  });
  return dx;
}

}  // namespace plm_engine
