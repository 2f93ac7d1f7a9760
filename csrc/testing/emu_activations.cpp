// The kernels of csrc/cuda/activations.cu under the emulator, with a launcher that mirrors
// activations.cu's launch(): packed inputs flattened to one row, 16-byte packs when everything is
// aligned, blocks of kThreads along the row and a grid-stride loop over rows.
#include "testing/emu_prelude.h"
//
#include <cstring>
#include <string>

#include "cuda/activations_kernels.cuh"

namespace plm_emu_ops {
namespace {

using namespace plm_engine;

template <typename T, typename Op>
void launch(const void* const* in, const int64_t* in_row_stride, void* const* out, int64_t rows, int64_t n,
            int64_t max_grid_y, Op op) {
  if (rows == 0 || n == 0) return;
  bool packed = true;
  for (int j = 0; j < Op::NIN; ++j) packed = packed && (rows == 1 || in_row_stride[j] == n);
  if (packed) n *= rows, rows = 1;
  constexpr int VEC = 16 / sizeof(T);
  EltArgs<T, Op::NIN, Op::NOUT> a;
  bool vec_ok = n % VEC == 0;
  for (int j = 0; j < Op::NIN; ++j) {
    a.in[j] = static_cast<const T*>(in[j]);
    a.in_row_stride[j] = rows > 1 ? in_row_stride[j] : 0;
    vec_ok = vec_ok && a.in_row_stride[j] % VEC == 0 && reinterpret_cast<uintptr_t>(a.in[j]) % 16 == 0;
  }
  for (int j = 0; j < Op::NOUT; ++j) {
    a.out[j] = static_cast<T*>(out[j]);
    vec_ok = vec_ok && reinterpret_cast<uintptr_t>(a.out[j]) % 16 == 0;
  }
  a.rows = rows, a.n = n;
  const int vec = vec_ok ? VEC : 1;
  const int64_t blocks_x = (n / vec + kThreads - 1) / kThreads;
  int64_t grid_y = std::min<int64_t>(rows, 65535);
  if (max_grid_y > 0) grid_y = std::min(grid_y, max_grid_y);
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(grid_y));
  if (vec_ok) {
    plm_emu::emu_launch(eltwise_kernel<T, VEC, Op>, grid, dim3(kThreads), 0, a, op);
  } else {
    plm_emu::emu_launch(eltwise_kernel<T, 1, Op>, grid, dim3(kThreads), 0, a, op);
  }
}

template <typename Op>
void run(Dtype t, int n_in, int n_out, const void* const* in, const int64_t* in_row_stride, void* const* out,
         int64_t rows, int64_t n, int64_t max_grid_y) {
  if (n_in != Op::NIN || n_out != Op::NOUT) throw std::invalid_argument("cuda_emu: wrong number of activation tensors");
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) launch<T>(in, in_row_stride, out, rows, n, max_grid_y, Op{});
  });
}

}  // namespace

void activation(const char* kind, bool tanh, Dtype t, const void* const* in, const int64_t* in_row_stride, int n_in,
                void* const* out, int n_out, int64_t rows, int64_t n, int64_t max_grid_y) {
  const std::string k = kind;
  if (k == "swiglu_fwd") {
    run<SwigluFwd>(t, n_in, n_out, in, in_row_stride, out, rows, n, max_grid_y);
  } else if (k == "swiglu_bwd") {
    run<SwigluBwd>(t, n_in, n_out, in, in_row_stride, out, rows, n, max_grid_y);
  } else if (k == "gelu_fwd") {
    tanh ? run<GeluFwd<true>>(t, n_in, n_out, in, in_row_stride, out, rows, n, max_grid_y)
         : run<GeluFwd<false>>(t, n_in, n_out, in, in_row_stride, out, rows, n, max_grid_y);
  } else if (k == "gelu_bwd") {
    tanh ? run<GeluBwd<true>>(t, n_in, n_out, in, in_row_stride, out, rows, n, max_grid_y)
         : run<GeluBwd<false>>(t, n_in, n_out, in, in_row_stride, out, rows, n, max_grid_y);
  } else {
    throw std::invalid_argument("cuda_emu: unknown activation " + k);
  }
}

}  // namespace plm_emu_ops
