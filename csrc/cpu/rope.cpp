// RoPE on the CPU.
//
// OpenMP over tokens (at::parallel_for); each task runs rope_token_range (cpu/rope_kernels.inc) of the
// build cpu::cpu_isa() names: the kernels are written once against the vector policy of cpu/simd.h and
// compiled for every instruction set (simd_instantiate.inc). A token's cos/sin row is widened once to
// fp32 scratch (with the sign of sin applied), then every q and k head of that token is rotated from it.
// Each output element is computed by one thread from its own inputs only: the result does not depend on
// the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_memory.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "rope.h"

namespace plm_engine {
namespace {

struct Strides {
  int64_t b, s, h;
};

inline Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct RopeProblem {
  Strides sq, sk, sqo, sko;
  int64_t cos_row_stride, cos_col_stride, seqlen, hq, hk, half, head_dim;
  bool interleaved;
  float sin_sign;
};

#define PLM_SIMD_KERNELS "cpu/rope_kernels.inc"
#include "cpu/simd_instantiate.inc"

template <typename T, typename C>
void rope_tokens(const T* q, const T* k, T* qo, T* ko, const C* cos, const C* sin, const int64_t* pos,
                 int64_t tokens, const RopeProblem& P) {
  // Enough tokens per task that the scheduling overhead stays small for decode-sized calls.
  const int64_t per_token = (P.hq + P.hk) * P.head_dim;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_token));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    PLM_CPU_CALL(rope_token_range, q, k, qo, ko, cos, sin, pos, begin, end, P);
  });
}

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
  // Fresh outputs of 32 MiB and more (a long prefill's q) get huge pages: see common/cpu_memory.h.
  Tensor q_out = cpu::empty_output(q.sizes(), q.options());
  Tensor k_out = cpu::empty_output(k.sizes(), k.options());
  rope_cpu_kernel(q, k, q_out, k_out, cos, sin, positions, interleaved, conjugate);
  return {q_out, k_out};
}

void rope_inplace_cpu(Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin,
                      const std::optional<Tensor>& positions, bool interleaved, bool conjugate) {
  check_rope_args(q, k, cos, sin, positions);
  rope_cpu_kernel(q, k, q, k, cos, sin, positions, interleaved, conjugate);
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("rope", &plm_engine::rope_cpu);
  m.impl("rope_", &plm_engine::rope_inplace_cpu);
}
