// RoPE on the CPU.
//
// OpenMP over tokens: a token's cos/sin row is converted once to fp32 scratch (with the sign of sin
// already applied), then every q and k head of that token is rotated from it. The per-token code is
// compiled for AVX-512, AVX2 and the baseline ISA (target_clones); the loader picks the best. The per-head loops are
// unit-stride over the rotary half (rotate_half layout) or over adjacent pairs (interleaved), plain
// fp32 arithmetic that the compiler vectorises; in place works because each iteration reads exactly
// the elements it writes.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <vector>

#include "common/checks.h"
#include "common/cpu_convert.h"
#include "rope.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PLM_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PLM_VEC_CLONES
#endif

namespace plm_engine {
namespace {

struct Strides {
  int64_t b, s, h;
};

inline Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
inline void rotate_head(const T* x, T* y, const float* c, const float* s, int64_t half, int64_t head_dim,
                        bool interleaved) {
  if (interleaved) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = cpu::load_f32(x[2 * i]), x2 = cpu::load_f32(x[2 * i + 1]);
      y[2 * i] = cpu::store_as<T>(x1 * c[i] - x2 * s[i]);
      y[2 * i + 1] = cpu::store_as<T>(x2 * c[i] + x1 * s[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = cpu::load_f32(x[i]), x2 = cpu::load_f32(x[i + half]);
      y[i] = cpu::store_as<T>(x1 * c[i] - x2 * s[i]);
      y[i + half] = cpu::store_as<T>(x2 * c[i] + x1 * s[i]);
    }
  }
  // Features past rotary_dim pass through; in place they are already where they belong.
  if (y != x) {
    for (int64_t i = 2 * half; i < head_dim; ++i) y[i] = x[i];
  }
}

struct RopeProblem {
  Strides sq, sk, sqo, sko;
  int64_t cos_row_stride, cos_col_stride, seqlen, hq, hk, half, head_dim;
  bool interleaved;
  float sin_sign;
};

// One token: its cos/sin row to fp32 scratch (c, s), then every q and k head. Compiled per ISA.
template <typename T, typename C>
PLM_VEC_CLONES void rope_token(const T* q, const T* k, T* qo, T* ko, const C* cos, const C* sin, int64_t t,
                               int64_t p, const RopeProblem& P, float* c, float* s) {
  const int64_t b = t / P.seqlen, si = t % P.seqlen;
  const C* crow = cos + p * P.cos_row_stride;
  const C* srow = sin + p * P.cos_row_stride;
  for (int64_t i = 0; i < P.half; ++i) {
    c[i] = cpu::load_f32(crow[i * P.cos_col_stride]);
    s[i] = P.sin_sign * cpu::load_f32(srow[i * P.cos_col_stride]);
  }
  for (int64_t h = 0; h < P.hq; ++h) {
    rotate_head<T>(q + b * P.sq.b + si * P.sq.s + h * P.sq.h, qo + b * P.sqo.b + si * P.sqo.s + h * P.sqo.h, c, s,
                   P.half, P.head_dim, P.interleaved);
  }
  for (int64_t h = 0; h < P.hk; ++h) {
    rotate_head<T>(k + b * P.sk.b + si * P.sk.s + h * P.sk.h, ko + b * P.sko.b + si * P.sko.s + h * P.sko.h, c, s,
                   P.half, P.head_dim, P.interleaved);
  }
}

template <typename T, typename C>
void rope_tokens(const T* q, const T* k, T* qo, T* ko, const C* cos, const C* sin, const int64_t* pos,
                 int64_t tokens, const RopeProblem& P) {
  // Enough tokens per task that the scheduling overhead stays small for decode-sized calls.
  const int64_t per_token = (P.hq + P.hk) * P.head_dim;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_token));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> cbuf(P.half), sbuf(P.half);
    for (int64_t t = begin; t < end; ++t) {
      rope_token<T, C>(q, k, qo, ko, cos, sin, t, pos != nullptr ? pos[t] : t % P.seqlen, P, cbuf.data(),
                       sbuf.data());
    }
  });
}

}  // namespace

void rope_cpu_kernel(const Tensor& q, const Tensor& k, Tensor& q_out, Tensor& k_out, const Tensor& cos,
                     const Tensor& sin, const std::optional<Tensor>& positions, bool interleaved, bool conjugate) {
  const int64_t batch = q.size(0), seqlen = q.size(1), half = cos.size(1);
  if (batch * seqlen == 0) return;
  const int64_t* pos = nullptr;
  if (positions.has_value()) {
    // Positions index the cos/sin rows: refuse out-of-range ones here rather than read past the table.
    pos = positions->const_data_ptr<int64_t>();
    const int64_t n = positions->numel(), rows = cos.size(0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(pos[i] >= 0 && pos[i] < rows, "position ", pos[i], " (token ", i,
                  ") is outside the cos/sin table of ", rows, " rows");
    }
  }
  const RopeProblem P{strides_of(q), strides_of(k), strides_of(q_out), strides_of(k_out), cos.stride(0),
                      cos.stride(1), seqlen, q.size(2), k.size(2), half, q.size(3), interleaved,
                      conjugate ? -1.f : 1.f};
  auto run = [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using C = decltype(c_tag);
    rope_tokens<T, C>(q.const_data_ptr<T>(), k.const_data_ptr<T>(), q_out.mutable_data_ptr<T>(),
                      k_out.mutable_data_ptr<T>(), cos.const_data_ptr<C>(), sin.const_data_ptr<C>(), pos,
                      batch * seqlen, P);
  };
  // fp32, fp16, bf16 q/k (check_rope_args refuses others); cos/sin fp32 or q's dtype.
  const bool cos_f32 = cos.scalar_type() == at::kFloat;
  switch (q.scalar_type()) {
    case at::kFloat:
      run(float{}, float{});
      break;
    case at::kHalf:
      cos_f32 ? run(c10::Half{}, float{}) : run(c10::Half{}, c10::Half{});
      break;
    case at::kBFloat16:
      cos_f32 ? run(c10::BFloat16{}, float{}) : run(c10::BFloat16{}, c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "rope: unsupported dtype ", q.scalar_type());
  }
}

std::tuple<Tensor, Tensor> rope_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                    const std::optional<Tensor>& positions, bool interleaved, bool conjugate) {
  check_rope_args(q, k, cos, sin, positions);
  Tensor q_out = at::empty(q.sizes(), q.options());
  Tensor k_out = at::empty(k.sizes(), k.options());
  rope_cpu_kernel(q, k, q_out, k_out, cos, sin, positions, interleaved, conjugate);
  return {q_out, k_out};
}

void rope_inplace_cpu(Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin,
                      const std::optional<Tensor>& positions, bool interleaved, bool conjugate) {
  check_rope_args(q, k, cos, sin, positions);
  rope_cpu_kernel(q, k, q, k, cos, sin, positions, interleaved, conjugate);
}

}  // namespace plm_engine
