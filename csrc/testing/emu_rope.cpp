// The kernel of csrc/cuda/rope.cu under the emulator, with a launcher that mirrors rope.cu's.
#include "testing/emu_prelude.h"
//
#include "cuda/rope_kernels.cuh"

namespace plm_emu_ops {
namespace {

using namespace plm_engine;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename C, bool INTERLEAVED>
void launch(const RopeCall& c, const RopeArgs& a) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int PAIRS = INTERLEAVED ? VEC / 2 : VEC;
  bool vec_ok = a.half % PAIRS == 0;
  const void* ptrs[4] = {c.q, c.k, c.q_out, c.k_out};
  const int64_t* strides[4] = {c.q_stride, c.k_stride, c.qo_stride, c.ko_stride};
  for (int i = 0; i < 4; ++i)
    vec_ok = vec_ok && aligned16(ptrs[i]) && strides[i][0] % VEC == 0 && strides[i][1] % VEC == 0 &&
             strides[i][2] % VEC == 0;
  const dim3 grid(static_cast<unsigned>(c.batch * c.seqlen));
  const T* qp = static_cast<const T*>(c.q);
  const T* kp = static_cast<const T*>(c.k);
  T* qop = static_cast<T*>(c.q_out);
  T* kop = static_cast<T*>(c.k_out);
  const C* cp = static_cast<const C*>(c.cos);
  const C* sp = static_cast<const C*>(c.sin);
  if (vec_ok) {
    plm_emu::emu_launch(rope_kernel<T, C, INTERLEAVED, PAIRS, true>, grid, dim3(kThreads), 0, qp, kp, qop, kop, cp, sp,
                        c.positions, a);
  } else {
    plm_emu::emu_launch(rope_kernel<T, C, INTERLEAVED, 1, false>, grid, dim3(kThreads), 0, qp, kp, qop, kop, cp, sp,
                        c.positions, a);
  }
}

}  // namespace

void rope(const RopeCall& c) {
  if (c.batch * c.seqlen == 0 || c.hq + c.hk == 0) return;
  RopeArgs a;
  a.q_b = c.q_stride[0], a.q_s = c.q_stride[1], a.q_h = c.q_stride[2];
  a.k_b = c.k_stride[0], a.k_s = c.k_stride[1], a.k_h = c.k_stride[2];
  a.qo_b = c.qo_stride[0], a.qo_s = c.qo_stride[1], a.qo_h = c.qo_stride[2];
  a.ko_b = c.ko_stride[0], a.ko_s = c.ko_stride[1], a.ko_h = c.ko_stride[2];
  a.cos_row = c.cos_stride[0], a.cos_col = c.cos_stride[1];
  a.seqlen = c.seqlen, a.n_pos = c.n_pos;
  a.hq = c.hq, a.hk = c.hk, a.half = c.half, a.head_dim = c.head_dim;
  a.sin_sign = c.conjugate ? -1.f : 1.f;
  a.copy_pass = !c.inplace && a.head_dim > 2 * a.half;
  dispatch(c.t, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      auto run = [&](auto cos_tag) {
        using C = decltype(cos_tag);
        if (c.interleaved) {
          launch<T, C, true>(c, a);
        } else {
          launch<T, C, false>(c, a);
        }
      };
      if (c.c == Dtype::kF32) {
        run(float{});
      } else {
        run(T{});
      }
    }
  });
}

}  // namespace plm_emu_ops
