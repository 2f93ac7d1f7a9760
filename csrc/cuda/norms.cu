// LayerNorm / RMSNorm on CUDA, with the optional fused residual add. Same math and return conventions
// as csrc/cpu/norms.cpp (see csrc/norms.h for the contract).
//
// Layout. A row is handled by a "row group" of threads: one warp when the row is short (several rows
// per block, warp-shuffle reductions only), else one block of up to 1024 (forward) / 512 (backward)
// threads with a warp-shuffle + shared-memory reduction. Thread t of a group owns the packs
// t, t + threads, t + 2*threads, ... of the row (a pack = 16 bytes of activations: 4 fp32 or 8
// half/bf16), so every warp access is one coalesced 512-byte transaction. When the row pointers are
// not 16-byte aligned or n is not a multiple of the pack width, the same kernels run with 1-element
// packs.
//
// Registers. Each thread caches ELEMS fp32 values of its row in registers (ITERS packs). A row that
// fits (n <= threads * ELEMS) is read from global memory exactly once; a longer row is processed in
// chunks of threads * ELEMS elements, and x (and residual) are re-read, mostly from L2, for the output
// pass.
//
// Numerics. Statistics and every accumulation are fp32. The variance is never E[x^2] - E[x]^2: each
// thread computes the exact two-pass mean and centred sum of squares of the values it holds, and those
// (count, mean, M2) triples are merged pairwise (Chan et al.), which is as robust as a two-pass over
// the whole row and needs one read of it. RMSNorm uses the same path with the mean pinned to 0, so M2
// is the plain sum of squares. With a residual, h = x + residual is rounded to T and stored, and the
// norm is computed on the rounded h, so forward, backward and the returned h agree exactly.
//
// Backward. dx = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy)) [+ dh], the last mean only for
// LayerNorm. dweight = sum_rows dy*xhat and dbias = sum_rows dy are reduced without atomics: the grid
// holds a few waves' worth of row groups, each group takes a contiguous range of rows and accumulates
// per-column fp32 partials (in registers for cached rows, in its own row of the partial buffer
// otherwise), the (groups, n) partial buffer is then summed over groups by a small column kernel that
// also casts to the weight dtype. The result is deterministic for a given GPU model.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/dispatch.h"
#include "cuda/norms_kernels.cuh"
#include "norms.h"

namespace plm_engine {
namespace {

// ---- launchers --------------------------------------------------------------------------------

template <typename T, typename W, int VEC>
void launch_fwd(const T* x, const T* res, const W* w, const W* b, T* y, T* h, float* mean, float* rstd, int64_t rows,
                int64_t n, float eps, bool is_rms, cudaStream_t stream) {
  constexpr int kIters = VEC == 1 ? kFwdElemsUnpacked : kFwdElems / VEC;
  const LaunchShape s = pick_shape(n, VEC, kIters, kFwdMaxThreads);
  const dim3 block(s.threads, s.rows_per_block);
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(rows, s.rows_per_block), std::numeric_limits<int>::max());
  const int ni = static_cast<int>(n);
  if (s.cached) {
    norm_fwd_kernel<T, W, VEC, kIters, true>
        <<<static_cast<unsigned>(blocks), block, 0, stream>>>(x, res, w, b, y, h, mean, rstd, rows, ni, eps, is_rms);
  } else {
    norm_fwd_kernel<T, W, VEC, kIters, false>
        <<<static_cast<unsigned>(blocks), block, 0, stream>>>(x, res, w, b, y, h, mean, rstd, rows, ni, eps, is_rms);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename W, int VEC, bool CACHED>
int64_t bwd_groups(const LaunchShape& s, int64_t rows) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, norm_bwd_kernel<T, W, VEC, kBwdElems / VEC, CACHED>, s.threads * s.rows_per_block, 0));
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
  const int64_t one_row_each = ceil_div<int64_t>(rows, s.rows_per_block);
  const int64_t wanted = std::max<int64_t>(ceil_div<int64_t>(rows, int64_t{s.rows_per_block} * kMinRowsPerGroup),
                                           2 * int64_t{sms});
  return std::min({resident, one_row_each, wanted}) * s.rows_per_block;
}

template <typename T, typename W, int VEC>
void launch_bwd(const T* dy, const T* dh, const T* h, const W* w, const float* mean, const float* rstd, T* dx, W* dw,
                W* db, int64_t rows, int64_t n, bool is_rms, const at::TensorOptions& f32, cudaStream_t stream) {
  constexpr int kIters = kBwdElems / VEC;
  const LaunchShape s = pick_shape(n, VEC, kIters, kBwdMaxThreads);
  const int64_t groups =
      s.cached ? bwd_groups<T, W, VEC, true>(s, rows) : bwd_groups<T, W, VEC, false>(s, rows);
  const int64_t rows_per_group = ceil_div<int64_t>(rows, groups);
  // Cached groups write every entry of their partial row; chunked groups add into it.
  Tensor dw_part = s.cached ? at::empty({groups, n}, f32) : at::zeros({groups, n}, f32);
  Tensor db_part;
  if (db != nullptr) db_part = s.cached ? at::empty({groups, n}, f32) : at::zeros({groups, n}, f32);
  float* dwp = dw_part.mutable_data_ptr<float>();
  float* dbp = db != nullptr ? db_part.mutable_data_ptr<float>() : nullptr;
  const dim3 block(s.threads, s.rows_per_block);
  const unsigned blocks = static_cast<unsigned>(groups / s.rows_per_block);
  const int ni = static_cast<int>(n);
  if (s.cached) {
    norm_bwd_kernel<T, W, VEC, kIters, true>
        <<<blocks, block, 0, stream>>>(dy, dh, h, w, mean, rstd, dx, dwp, dbp, rows, ni, rows_per_group, is_rms);
  } else {
    norm_bwd_kernel<T, W, VEC, kIters, false>
        <<<blocks, block, 0, stream>>>(dy, dh, h, w, mean, rstd, dx, dwp, dbp, rows, ni, rows_per_group, is_rms);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 rblock(kReduceCols, kReduceSlices);
  const unsigned rblocks = static_cast<unsigned>(ceil_div<int64_t>(n, kReduceCols));
  reduce_partials_kernel<W><<<rblocks, rblock, 0, stream>>>(dwp, dbp, dw, db, groups, ni);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                         const std::optional<Tensor>& bias,
                                                         const std::optional<Tensor>& residual, double eps,
                                                         bool is_rms) {
  check_norm_fwd_args(x, weight, bias, residual);
  TORCH_CHECK(x.is_cuda(), "norm_fwd_cuda: x must be a CUDA tensor, got ", x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n <= kMaxN, "norm_fwd_cuda: rows longer than ", kMaxN, " elements are not supported, got ", n);
  const c10::cuda::CUDAGuard guard(x.device());
  auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor h = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({is_rms ? 0 : rows}, f32);
  Tensor rstd = at::empty({rows}, f32);
  if (rows == 0 || n == 0) {
    if (n == 0) rstd.fill_(1.f / std::sqrt(static_cast<float>(eps))), mean.zero_();
    return {y, h, mean, rstd};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PLM_DISPATCH_NORM_TYPES(x.scalar_type(), weight.scalar_type(), "norm_fwd_cuda", [&] {
    const T* xp = x.const_data_ptr<T>();
    const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
    const W* wp = weight.const_data_ptr<W>();
    const W* bp = bias ? bias->const_data_ptr<W>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    T* hp = residual ? h.mutable_data_ptr<T>() : nullptr;
    float* mp = is_rms ? nullptr : mean.mutable_data_ptr<float>();
    float* sp = rstd.mutable_data_ptr<float>();
    constexpr int kVec = pack_width<T>();
    constexpr int kWAlign = weight_pack_align<T, W>();
    // Row r starts r * n elements in, so n % kVec == 0 plus aligned base pointers make every pack
    // 16-byte aligned. A storage offset (x[1:] of a (rows, 3) tensor) or an odd n takes 1-element packs.
    const bool vec = n % kVec == 0 && cuda::is_aligned(xp, 16) && cuda::is_aligned(rp, 16) &&
                     cuda::is_aligned(yp, 16) && cuda::is_aligned(hp, 16) && cuda::is_aligned(wp, kWAlign) &&
                     cuda::is_aligned(bp, kWAlign);
    if (vec) {
      launch_fwd<T, W, kVec>(xp, rp, wp, bp, yp, hp, mp, sp, rows, n, static_cast<float>(eps), is_rms, stream);
    } else {
      launch_fwd<T, W, 1>(xp, rp, wp, bp, yp, hp, mp, sp, rows, n, static_cast<float>(eps), is_rms, stream);
    }
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(const Tensor& dy, const std::optional<Tensor>& dh,
                                                 const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                 const Tensor& rstd, bool has_bias, bool is_rms) {
  check_norm_bwd_args(dy, dh, h, weight, mean, rstd, is_rms);
  TORCH_CHECK(h.is_cuda(), "norm_bwd_cuda: h must be a CUDA tensor, got ", h.device());
  const int64_t rows = h.size(0), n = h.size(1);
  TORCH_CHECK(n <= kMaxN, "norm_bwd_cuda: rows longer than ", kMaxN, " elements are not supported, got ", n);
  const c10::cuda::CUDAGuard guard(h.device());
  Tensor dx = at::empty_like(h);
  if (rows == 0 || n == 0) {
    Tensor dw = at::zeros({n}, weight.options());
    Tensor db = has_bias ? at::zeros({n}, weight.options()) : at::empty({0}, weight.options());
    return {dx, dw, db};
  }
  Tensor dw = at::empty({n}, weight.options());
  Tensor db = has_bias ? at::empty({n}, weight.options()) : at::empty({0}, weight.options());
  const auto f32 = h.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PLM_DISPATCH_NORM_TYPES(h.scalar_type(), weight.scalar_type(), "norm_bwd_cuda", [&] {
    const T* dyp = dy.const_data_ptr<T>();
    const T* dhp = dh ? dh->const_data_ptr<T>() : nullptr;
    const T* hp = h.const_data_ptr<T>();
    const W* wp = weight.const_data_ptr<W>();
    const float* mp = is_rms ? nullptr : mean.const_data_ptr<float>();
    const float* sp = rstd.const_data_ptr<float>();
    T* dxp = dx.mutable_data_ptr<T>();
    W* dwp = dw.mutable_data_ptr<W>();
    W* dbp = has_bias ? db.mutable_data_ptr<W>() : nullptr;
    constexpr int kVec = pack_width<T>();
    constexpr int kWAlign = weight_pack_align<T, W>();
    // The fp32 partial rows start at multiples of n * 4 bytes, so n % kVec == 0 aligns them as well.
    const bool vec = n % kVec == 0 && cuda::is_aligned(dyp, 16) && cuda::is_aligned(dhp, 16) &&
                     cuda::is_aligned(hp, 16) && cuda::is_aligned(dxp, 16) && cuda::is_aligned(wp, kWAlign);
    if (vec) {
      launch_bwd<T, W, kVec>(dyp, dhp, hp, wp, mp, sp, dxp, dwp, dbp, rows, n, is_rms, f32, stream);
    } else {
      launch_bwd<T, W, 1>(dyp, dhp, hp, wp, mp, sp, dxp, dwp, dbp, rows, n, is_rms, f32, stream);
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CUDA, m) {
  m.impl("norm_fwd", &plm_engine::norm_fwd_cuda);
  m.impl("norm_bwd", &plm_engine::norm_bwd_cuda);
}
