// Fused cross-entropy on the CPU: loss and gradient per row, OpenMP over rows.
//
// Pass 1 takes the online (max, sum of exp) and the plain sum over L1-sized column blocks; pass 2
// writes softmax - smoothing into dlogits, which may be the logits themselves (each element is read
// before it is written). Two builds of the row kernel, chosen at run time:
//  - AVX-512 intrinsics (cpu/simd512.h): pass 1 keeps the exponentials in a per-thread fp32 row
//    buffer, so the row is read once and written once with one exp per element;
//  - portable loops (softmax.h) compiled per ISA by target_clones: pass 2 re-reads the row.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_convert.h"
#include "cpu/simd512.h"
#include "cross_entropy.h"
#include "softmax.h"

namespace plm_engine {
namespace {

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) float ce_row(const T* x, T* dx, int64_t v,
                                                                         int64_t t, float eps, float* buf) {
  const auto [m, s] = cpu::row_max_sumexp(x, v, 1.f, buf);
  float sum_x = 0.f;
  if (eps > 0.f) {
#pragma omp simd reduction(+ : sum_x)
    for (int64_t i = 0; i < v; ++i) sum_x += cpu::to_f32(x[i]);
  }
  const float x_t = cpu::to_f32(x[t]);
  // lse - (1 - eps) x_t - eps mean(x), arranged so the large common offset m cancels exactly first.
  const float loss = std::log(s) + (1.f - eps) * (m - x_t) + (eps > 0.f ? eps * (m - sum_x / v) : 0.f);
  const float inv = 1.f / s, smooth = eps / v;
#pragma omp simd
  for (int64_t i = 0; i < v; ++i) dx[i] = cpu::from_f32<T>(cpu::exp_approx(cpu::to_f32(x[i]) - m) * inv - smooth);
  // The target's own term, from the fp32 value (not the already rounded dx[t]).
  dx[t] = static_cast<T>(cpu::exp_approx(x_t - m) * inv - smooth - (1.f - eps));
  return loss;
}

#ifdef PLM_CPU_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same false positive, reported from the caller
namespace v512k {
using namespace cpu::v512;

// Loss of one row; writes its gradient into dx (which may be x). e: >= v floats, bm: >= v / kBlock + 1.
template <typename T>
float ce_row(const T* x, T* dx, int64_t v, int64_t t, float eps, float* e, float* bm) {
  float sum_x = 0.f;
  const RowExp r = row_exp(x, v, 1.f, e, bm, eps > 0.f ? &sum_x : nullptr);
  const float x_t = cpu::load_f32(x[t]);  // before pass 2: dx may be x
  if (r.nan) {
    const V q = set1(std::numeric_limits<float>::quiet_NaN());
    for (int64_t i = 0; i < v; i += W) store(dx + i, q, first(v - i));
    return std::numeric_limits<float>::quiet_NaN();
  }
  // lse - (1 - eps) x_t - eps mean(x), arranged so the large common offset m cancels exactly first.
  const float loss = std::log(r.s) + (1.f - eps) * (r.m - x_t) + (eps > 0.f ? eps * (r.m - sum_x / v) : 0.f);
  const float inv = 1.f / r.s, smooth = eps / v;
  const V vsmooth = set1(smooth);
  for (int64_t b0 = 0, blk = 0; b0 < v; b0 += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, v - b0);
    const V f = set1(block_factor(bm[blk], r.m, inv));
    for (int64_t i = 0; i < len; i += W) {
      const M k = first(len - i);
      store(dx + b0 + i, _mm512_fmsub_ps(load(e + b0 + i, k), f, vsmooth), k);
    }
  }
  // The target's own term, from the fp32 value (not the already rounded dx[t]).
  dx[t] = cpu::store_as<T>(_mm512_cvtss_f32(exp(set1(x_t - r.m))) * inv - smooth - (1.f - eps));
  return loss;
}

}  // namespace v512k
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_CPU_AVX512

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
      float buf[cpu::kBlock];
#ifdef PLM_CPU_AVX512
      const bool simd = cpu::avx512_enabled();
      std::vector<float> e(simd ? v : 0), bm(simd ? v / cpu::v512::kBlock + 1 : 0);
#endif
      for (int64_t r = begin; r < end; ++r) {
        if (tp[r] == ignore_index) {
          lp[r] = 0.f;
          std::fill(dxp + r * v, dxp + (r + 1) * v, static_cast<scalar_t>(0.f));
          continue;
        }
#ifdef PLM_CPU_AVX512
        if (simd) {
          lp[r] = v512k::ce_row<scalar_t>(xp + r * v, dxp + r * v, v, tp[r], eps, e.data(), bm.data());
          continue;
        }
#endif
        lp[r] = ce_row<scalar_t>(xp + r * v, dxp + r * v, v, tp[r], eps, buf);
      }
    });
  });
  return loss;
}

}  // namespace

std::tuple<Tensor, Tensor> cross_entropy_fwd_cpu(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                 double label_smoothing) {
  check_cross_entropy_args(logits, target, label_smoothing);
  Tensor dlogits = at::empty_like(logits);
  Tensor loss = run(logits, target, dlogits, ignore_index, label_smoothing);
  return {loss, dlogits};
}

Tensor cross_entropy_fwd_inplace_cpu(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                     double label_smoothing) {
  check_cross_entropy_args(logits, target, label_smoothing);
  return run(logits, target, logits, ignore_index, label_smoothing);
}

}  // namespace plm_engine
