// LayerNorm / RMSNorm on the CPU, with the optional fused residual add.
//
// One row at a time per thread (OpenMP over rows). A row is loaded once into an fp32 scratch row that
// stays in L1/L2 while the statistics and the output are computed from it, so memory sees one read of
// the inputs and one write of each output. Inner loops are plain fp32 loops that the compiler
// vectorises; reductions accumulate in fp32.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "ops.h"

namespace plm_engine {
namespace {

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// Loads n values of row `src` (+ `res` if given) into fp32 `dst`; with a residual also stores the sum
// rounded to T into `h_out`, and uses that rounded value so forward and backward see the same h.
template <typename T>
void load_row(const T* src, const T* res, T* h_out, float* dst, int64_t n) {
  if (res == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    T h = static_cast<T>(to_f(src[i]) + to_f(res[i]));
    h_out[i] = h;
    dst[i] = to_f(h);
  }
}

template <typename T, typename W>
void norm_fwd_rows(const T* x, const T* res, const W* w, const W* b, T* y, T* h, float* mean_out,
                   float* rstd_out, int64_t rows, int64_t n, float eps, bool is_rms) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    float* v = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * n;
      load_row<T>(x + off, res ? res + off : nullptr, h ? h + off : nullptr, v, n);
      float mu = 0.f;
      if (!is_rms) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; ++i) s += v[i];
        mu = s / n;
      }
      // Second pass over the cached row: centred sum of squares, robust to large means.
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += (v[i] - mu) * (v[i] - mu);
      const float rstd = 1.f / std::sqrt(ss / n + eps);
      if (!is_rms) mean_out[r] = mu;
      rstd_out[r] = rstd;
      T* yr = y + off;
      if (b != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<T>((v[i] - mu) * rstd * to_f(w[i]) + to_f(b[i]));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<T>((v[i] - mu) * rstd * to_f(w[i]));
      }
    }
  });
}

template <typename T, typename W>
void norm_bwd_rows(const T* dy, const T* dh, const T* h, const W* w, const float* mean, const float* rstd,
                   T* dx, float* dw_partial, float* db_partial, int64_t rows, int64_t n, bool is_rms,
                   int64_t n_chunks) {
  // Rows are split into n_chunks fixed ranges; chunk c accumulates its dweight/dbias into row c of the
  // partial buffers, which the caller sums. Fixed chunks keep the result independent of scheduling.
  const int64_t per_chunk = (rows + n_chunks - 1) / n_chunks;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> hat_buf(n), wdy_buf(n);
    float* hat = hat_buf.data();
    float* wdy = wdy_buf.data();
    for (int64_t c = cbegin; c < cend; ++c) {
      float* dwp = dw_partial + c * n;
      float* dbp = db_partial ? db_partial + c * n : nullptr;
      const int64_t r_end = std::min(rows, (c + 1) * per_chunk);
      for (int64_t r = c * per_chunk; r < r_end; ++r) {
        const int64_t off = r * n;
        const float mu = is_rms ? 0.f : mean[r];
        const float rs = rstd[r];
        const T* hr = h + off;
        const T* dyr = dy + off;
        float c1 = 0.f, c2 = 0.f;
#pragma omp simd reduction(+ : c1, c2)
        for (int64_t i = 0; i < n; ++i) {
          const float g = to_f(dyr[i]);
          hat[i] = (to_f(hr[i]) - mu) * rs;
          wdy[i] = g * to_f(w[i]);
          c1 += hat[i] * wdy[i];
          c2 += wdy[i];
          dwp[i] += g * hat[i];
        }
        if (dbp != nullptr) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dbp[i] += to_f(dyr[i]);
        }
        c1 /= n;
        c2 = is_rms ? 0.f : c2 / n;
        T* dxr = dx + off;
        if (dh != nullptr) {
          const T* dhr = dh + off;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dxr[i] = static_cast<T>((wdy[i] - hat[i] * c1 - c2) * rs + to_f(dhr[i]));
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dxr[i] = static_cast<T>((wdy[i] - hat[i] * c1 - c2) * rs);
        }
      }
    }
  });
}

#define PLM_DISPATCH_NORM_TYPES(XT, WT, NAME, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, XT, NAME, [&] {                 \
    using T = scalar_t;                                                                      \
    if ((WT) == at::kFloat) {                                                                \
      using W = float;                                                                       \
      __VA_ARGS__();                                                                         \
    } else {                                                                                 \
      using W = T;                                                                           \
      __VA_ARGS__();                                                                         \
    }                                                                                        \
  })

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                        const std::optional<Tensor>& bias,
                                                        const std::optional<Tensor>& residual, double eps,
                                                        bool is_rms) {
  check_norm_fwd_args(x, weight, bias, residual, eps);
  const int64_t rows = x.size(0), n = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor h = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({is_rms ? 0 : rows}, f32);
  Tensor rstd = at::empty({rows}, f32);
  if (rows == 0 || n == 0) {
    if (n == 0) rstd.fill_(1.f / std::sqrt(static_cast<float>(eps))), mean.zero_();
    return {y, h, mean, rstd};
  }
  PLM_DISPATCH_NORM_TYPES(x.scalar_type(), weight.scalar_type(), "norm_fwd_cpu", [&] {
    norm_fwd_rows<T, W>(x.const_data_ptr<T>(), residual ? residual->const_data_ptr<T>() : nullptr,
                        weight.const_data_ptr<W>(), bias ? bias->const_data_ptr<W>() : nullptr,
                        y.mutable_data_ptr<T>(), residual ? h.mutable_data_ptr<T>() : nullptr,
                        is_rms ? nullptr : mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows,
                        n, static_cast<float>(eps), is_rms);
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy, const std::optional<Tensor>& dh,
                                                const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                const Tensor& rstd, bool has_bias, bool is_rms) {
  check_norm_bwd_args(dy, dh, h, weight, mean, rstd, is_rms);
  const int64_t rows = h.size(0), n = h.size(1);
  Tensor dx = at::empty_like(h);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  auto f32 = h.options().dtype(at::kFloat);
  Tensor dw_partial = at::zeros({n_chunks, n}, f32);
  Tensor db_partial = has_bias ? at::zeros({n_chunks, n}, f32) : Tensor();
  if (rows > 0 && n > 0) {
    PLM_DISPATCH_NORM_TYPES(h.scalar_type(), weight.scalar_type(), "norm_bwd_cpu", [&] {
      norm_bwd_rows<T, W>(dy.const_data_ptr<T>(), dh ? dh->const_data_ptr<T>() : nullptr, h.const_data_ptr<T>(),
                          weight.const_data_ptr<W>(), is_rms ? nullptr : mean.const_data_ptr<float>(),
                          rstd.const_data_ptr<float>(), dx.mutable_data_ptr<T>(), dw_partial.mutable_data_ptr<float>(),
                          has_bias ? db_partial.mutable_data_ptr<float>() : nullptr, rows, n, is_rms, n_chunks);
    });
  }
  Tensor dw = dw_partial.sum(0).to(weight.scalar_type());
  Tensor db = has_bias ? db_partial.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {dx, dw, db};
}

}  // namespace plm_engine
