// Fused cross-entropy on the CPU: loss and gradient per row, OpenMP over rows.
//
// Pass 1 takes the online (max, sum of exp) and the plain sum over L1-sized column blocks (softmax.h);
// pass 2 writes softmax - smoothing into dlogits, which may be the logits themselves (each element
// is read before it is written). So a vocabulary of any size costs two reads and one write of the row.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#include "common/checks.h"
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    // dlogits may alias logits: the row kernel reads every element before writing it.
    scalar_t* dxp = static_cast<scalar_t*>(dlogits.data_ptr());
    const int64_t* tp = target.const_data_ptr<int64_t>();
    float* lp = loss.mutable_data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      float buf[cpu::kBlock];
      for (int64_t r = begin; r < end; ++r) {
        if (tp[r] == ignore_index) {
          lp[r] = 0.f;
          std::fill(dxp + r * v, dxp + (r + 1) * v, static_cast<scalar_t>(0.f));
          continue;
        }
        lp[r] = ce_row<scalar_t>(xp + r * v, dxp + r * v, v, tp[r], static_cast<float>(label_smoothing), buf);
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
