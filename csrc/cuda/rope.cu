// RoPE on CUDA, out of place and in place (contract in csrc/rope.h).
//
// One block per token: its threads walk the (head, pair group) items of all q and k heads, so a
// decode step (one token, many heads) is still one well-filled block. When every address is 16-byte
// aligned, a thread moves 16 bytes per load: a rotate_half item is VEC pairs (x[i..i+VEC) and
// x[half+i..half+i+VEC)), an interleaved item is VEC/2 adjacent pairs in one vector. cos/sin are small
// and shared by all heads of a token, so they are read as scalars through the read-only cache. Math
// is fp32; in place is safe because every thread reads exactly the elements it writes.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "common/dispatch.h"
#include "cuda/rope_kernels.cuh"
#include "rope.h"

namespace plm_engine {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename C, bool INTERLEAVED>
void launch(const Tensor& q, const Tensor& k, Tensor& q_out, Tensor& k_out, const Tensor& cos, const Tensor& sin,
            const int64_t* pos, const RopeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int PAIRS = INTERLEAVED ? VEC / 2 : VEC;
  bool vec_ok = a.half % PAIRS == 0;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &q_out, &k_out}) {
    vec_ok = vec_ok && aligned16(t->const_data_ptr()) && t->stride(0) % VEC == 0 && t->stride(1) % VEC == 0 &&
             t->stride(2) % VEC == 0;
  }
  const dim3 grid(static_cast<unsigned>(q.size(0) * q.size(1)));
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  T* qop = q_out.mutable_data_ptr<T>();
  T* kop = k_out.mutable_data_ptr<T>();
  const C* cp = cos.const_data_ptr<C>();
  const C* sp = sin.const_data_ptr<C>();
  if (vec_ok) {
    rope_kernel<T, C, INTERLEAVED, PAIRS, true><<<grid, kThreads, 0, stream>>>(qp, kp, qop, kop, cp, sp, pos, a);
  } else {
    rope_kernel<T, C, INTERLEAVED, 1, false><<<grid, kThreads, 0, stream>>>(qp, kp, qop, kop, cp, sp, pos, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rope_cuda_kernel(const Tensor& q, const Tensor& k, Tensor& q_out, Tensor& k_out, const Tensor& cos,
                      const Tensor& sin, const std::optional<Tensor>& positions, bool interleaved, bool conjugate) {
  const int64_t tokens = q.size(0) * q.size(1);
  if (tokens == 0 || q.size(2) + k.size(2) == 0) return;
  TORCH_CHECK(tokens <= INT32_MAX, "rope: at most 2^31 - 1 tokens per call, got ", tokens);
  TORCH_CHECK((q.size(2) + k.size(2)) * q.size(3) <= INT32_MAX, "rope: too many heads x head_dim per token");
  const c10::cuda::CUDAGuard guard(q.device());
  RopeArgs a;
  a.q_b = q.stride(0), a.q_s = q.stride(1), a.q_h = q.stride(2);
  a.k_b = k.stride(0), a.k_s = k.stride(1), a.k_h = k.stride(2);
  a.qo_b = q_out.stride(0), a.qo_s = q_out.stride(1), a.qo_h = q_out.stride(2);
  a.ko_b = k_out.stride(0), a.ko_s = k_out.stride(1), a.ko_h = k_out.stride(2);
  a.cos_row = cos.stride(0), a.cos_col = cos.stride(1);
  a.seqlen = q.size(1), a.n_pos = cos.size(0);
  a.hq = static_cast<int>(q.size(2)), a.hk = static_cast<int>(k.size(2));
  a.half = static_cast<int>(cos.size(1)), a.head_dim = static_cast<int>(q.size(3));
  a.sin_sign = conjugate ? -1.f : 1.f;
  a.copy_pass = !q_out.is_same(q) && a.head_dim > 2 * a.half;
  const int64_t* pos = positions.has_value() ? positions->const_data_ptr<int64_t>() : nullptr;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "rope_cuda", [&] {
    using T = scalar_t;
    auto run = [&](auto cos_tag) {
      using C = decltype(cos_tag);
      if (interleaved) {
        launch<T, C, true>(q, k, q_out, k_out, cos, sin, pos, a, stream);
      } else {
        launch<T, C, false>(q, k, q_out, k_out, cos, sin, pos, a, stream);
      }
    };
    if (cos.scalar_type() == at::kFloat) {
      run(float{});
    } else {
      run(T{});
    }
  });
}

std::tuple<Tensor, Tensor> rope_cuda(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                     const std::optional<Tensor>& positions, bool interleaved, bool conjugate) {
  check_rope_args(q, k, cos, sin, positions);
  Tensor q_out = at::empty(q.sizes(), q.options());
  Tensor k_out = at::empty(k.sizes(), k.options());
  rope_cuda_kernel(q, k, q_out, k_out, cos, sin, positions, interleaved, conjugate);
  return {q_out, k_out};
}

void rope_inplace_cuda(Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin,
                       const std::optional<Tensor>& positions, bool interleaved, bool conjugate) {
  check_rope_args(q, k, cos, sin, positions);
  rope_cuda_kernel(q, k, q, k, cos, sin, positions, interleaved, conjugate);
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CUDA, m) {
  m.impl("rope", &plm_engine::rope_cuda);
  m.impl("rope_", &plm_engine::rope_inplace_cuda);
}
