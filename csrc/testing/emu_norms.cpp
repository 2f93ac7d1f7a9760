// The kernels of csrc/cuda/norms.cu under the emulator, with a launcher that mirrors norms.cu's.
#include "testing/emu_prelude.h"
//
#include "cuda/norms_kernels.cuh"

namespace plm_emu_ops {
namespace {

using plm_emu::emu_launch;
using plm_engine::ceil_div;
using plm_engine::LaunchShape;

template <typename T, typename W, int VEC>
void fwd(const T* x, const T* res, const W* w, const W* b, T* y, T* h, float* mean, float* rstd, int64_t rows,
         int64_t n, float eps, bool is_rms, int64_t max_blocks) {
  using namespace plm_engine;
  constexpr int kIters = VEC == 1 ? kFwdElemsUnpacked : kFwdElems / VEC;
  const LaunchShape s = pick_shape(n, VEC, kIters, kFwdMaxThreads);
  const dim3 block(s.threads, s.rows_per_block);
  int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(rows, s.rows_per_block), std::numeric_limits<int>::max());
  if (max_blocks > 0) blocks = std::min(blocks, max_blocks);
  const int ni = static_cast<int>(n);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (s.cached) {
    emu_launch(norm_fwd_kernel<T, W, VEC, kIters, true>, grid, block, 0, x, res, w, b, y, h, mean, rstd, rows, ni, eps,
               is_rms);
  } else {
    emu_launch(norm_fwd_kernel<T, W, VEC, kIters, false>, grid, block, 0, x, res, w, b, y, h, mean, rstd, rows, ni, eps,
               is_rms);
  }
}

template <typename T, typename W, int VEC>
void bwd(const T* dy, const T* dh, const T* h, const W* w, const float* mean, const float* rstd, T* dx, W* dw, W* db,
         int64_t rows, int64_t n, bool is_rms, int64_t bwd_blocks) {
  using namespace plm_engine;
  constexpr int kIters = kBwdElems / VEC;
  const LaunchShape s = pick_shape(n, VEC, kIters, kBwdMaxThreads);
  // norms.cu takes min(resident blocks, one row group per row, wanted) blocks; the test picks the first
  // (0: one row group per row), so that groups of several rows and groups with none are both tested.
  const int64_t one_row_each = ceil_div<int64_t>(rows, s.rows_per_block);
  const int64_t blocks = std::max<int64_t>(1, std::min(bwd_blocks > 0 ? bwd_blocks : one_row_each, one_row_each));
  const int64_t groups = blocks * s.rows_per_block;
  const int64_t rows_per_group = ceil_div<int64_t>(rows, groups);
  // Cached groups must write every entry of their partial row: NaN poison shows one they miss.
  const float fill = s.cached ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  std::vector<float> dw_part(static_cast<size_t>(groups * n), fill);
  std::vector<float> db_part(db != nullptr ? static_cast<size_t>(groups * n) : 0, fill);
  float* dwp = dw_part.data();
  float* dbp = db != nullptr ? db_part.data() : nullptr;
  const dim3 block(s.threads, s.rows_per_block);
  const dim3 grid(static_cast<unsigned>(blocks));
  const int ni = static_cast<int>(n);
  if (s.cached) {
    emu_launch(norm_bwd_kernel<T, W, VEC, kIters, true>, grid, block, 0, dy, dh, h, w, mean, rstd, dx, dwp, dbp, rows,
               ni, rows_per_group, is_rms);
  } else {
    emu_launch(norm_bwd_kernel<T, W, VEC, kIters, false>, grid, block, 0, dy, dh, h, w, mean, rstd, dx, dwp, dbp, rows,
               ni, rows_per_group, is_rms);
  }
  const dim3 rblock(kReduceCols, kReduceSlices);
  const dim3 rgrid(static_cast<unsigned>(ceil_div<int64_t>(n, kReduceCols)));
  emu_launch(reduce_partials_kernel<W>, rgrid, rblock, 0, dwp, dbp, dw, db, groups, ni);
}

// Same dispatch as norms.cu: W is T or fp32; 16-byte packs (V = pack_width<T>) when n, every data pointer
// (16 bytes) and every weight/bias pointer (weight_pack_align) allow them, else V = 1. Calls
// fn(T{}, W{}, std::integral_constant<int, V>{}).
template <typename Fn>
void dispatch_tw(Dtype t, Dtype w, int64_t n, std::initializer_list<const void*> data,
                 std::initializer_list<const void*> params, Fn&& fn) {
  dispatch(t, [&](auto t_tag) {
    using T = decltype(t_tag);
    if constexpr (!std::is_same_v<T, double>) {
      auto with_w = [&](auto w_tag) {
        using W = decltype(w_tag);
        constexpr int kVec = plm_engine::pack_width<T>();
        constexpr int kWAlign = plm_engine::weight_pack_align<T, W>();
        bool vec = n % kVec == 0;
        for (const void* p : data) vec = vec && plm_engine::cuda::is_aligned(p, 16);
        for (const void* p : params) vec = vec && plm_engine::cuda::is_aligned(p, kWAlign);
        if (vec) {
          fn(T{}, W{}, std::integral_constant<int, kVec>{});
        } else {
          fn(T{}, W{}, std::integral_constant<int, 1>{});
        }
      };
      if (w == Dtype::kF32) {
        with_w(float{});
      } else {
        with_w(T{});
      }
    }
  });
}

}  // namespace

void norm_fwd(Dtype t, Dtype w, const void* x, const void* residual, const void* weight, const void* bias, void* y,
              void* h, float* mean, float* rstd, int64_t rows, int64_t n, float eps, bool is_rms, int64_t max_blocks) {
  dispatch_tw(t, w, n, {x, residual, y, h}, {weight, bias}, [&](auto t_tag, auto w_tag, auto vec_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    fwd<T, W, decltype(vec_tag)::value>(static_cast<const T*>(x), static_cast<const T*>(residual),
                                        static_cast<const W*>(weight), static_cast<const W*>(bias),
                                        static_cast<T*>(y), static_cast<T*>(h), mean, rstd, rows, n, eps, is_rms,
                                        max_blocks);
  });
}

void norm_bwd(Dtype t, Dtype w, const void* dy, const void* dh, const void* h, const void* weight, const float* mean,
              const float* rstd, void* dx, void* dw, void* db, int64_t rows, int64_t n, bool is_rms,
              int64_t bwd_blocks) {
  dispatch_tw(t, w, n, {dy, dh, h, dx}, {weight}, [&](auto t_tag, auto w_tag, auto vec_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    bwd<T, W, decltype(vec_tag)::value>(static_cast<const T*>(dy), static_cast<const T*>(dh),
                                        static_cast<const T*>(h), static_cast<const W*>(weight), mean, rstd,
                                        static_cast<T*>(dx), static_cast<W*>(dw), static_cast<W*>(db), rows, n,
                                        is_rms, bwd_blocks);
  });
}

}  // namespace plm_emu_ops
