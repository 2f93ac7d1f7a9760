// The kernels of csrc/cuda/softmax.cu under the emulator, with a launcher that mirrors softmax.cu's.
#include "testing/emu_prelude.h"
//
#include "cuda/softmax_kernels.cuh"

namespace plm_emu_ops {

void softmax_fwd(Dtype t, const void* x, void* y, int64_t rows, int64_t sq, int64_t sk, float scale, bool causal) {
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    plm_emu::emu_launch(plm_engine::softmax_fwd_kernel<T>, dim3(static_cast<unsigned>(rows)),
                        dim3(plm_engine::threads_for(sk)), 0, static_cast<const T*>(x), static_cast<T*>(y), sq, sk,
                        scale, causal);
  });
}

void softmax_bwd(Dtype t, const void* dy, const void* y, void* dx, int64_t rows, int64_t n, float scale) {
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    plm_emu::emu_launch(plm_engine::softmax_bwd_kernel<T>, dim3(static_cast<unsigned>(rows)),
                        dim3(plm_engine::threads_for(n)), 0, static_cast<const T*>(dy), static_cast<const T*>(y),
                        static_cast<T*>(dx), n, scale);
  });
}

}  // namespace plm_emu_ops
