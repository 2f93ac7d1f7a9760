// LayerNorm / RMSNorm on CUDA, with the optional fused residual add. Same math and return conventions
// as csrc/cpu/norms.cpp (see csrc/ops.h for the contract).
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
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cuda/common.cuh"
#include "ops.h"

namespace plm_engine {
namespace {

using cuda::ceil_div;
using cuda::from_float;
using cuda::kFullMask;
using cuda::kWarpSize;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::to_float;

// Forward: up to 1024 threads per row (64 registers each), 16 cached fp32 values per thread with
// 16-byte packs, so rows up to 16384 stay in registers. With 1-element packs every value needs its
// own address and bounds test; 16 of them spill at 64 registers, so that path caches 8 (rows up to
// 8192) and chunks longer rows.
constexpr int kFwdMaxThreads = 1024;
constexpr int kFwdElems = 16;
constexpr int kFwdElemsUnpacked = 8;
// Backward: each thread holds xhat, dy and the dweight/dbias accumulators for its columns (4 x 16
// values), so blocks are capped at 512 threads (128 registers each); rows up to 8192 stay cached.
constexpr int kBwdMaxThreads = 512;
constexpr int kBwdElems = 16;
// Short rows: one warp per row, this many rows per block.
constexpr int kRowsPerWarpBlock = 4;
// Backward grid: aim for at least this many rows per row group so that writing and re-reading the
// (groups, n) fp32 partials stays small next to the dy/h/dx traffic.
constexpr int kMinRowsPerGroup = 16;
constexpr int kReduceCols = 32;
constexpr int kReduceSlices = 16;
// Element indices within a row are int; leave headroom for index + chunk arithmetic.
constexpr int64_t kMaxN = std::numeric_limits<int>::max() / 2;

// ---- reductions --------------------------------------------------------------------------------

// Count, mean and centred sum of squares (M2) of a set of values.
struct Moments {
  float count;
  float mean;
  float m2;
};

// Chan et al.'s pairwise update: exact in the counts, and the delta^2 term carries the difference of
// the means, so no large sum of squares is ever subtracted from another.
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (b.count == 0.f) return a;
  if (a.count == 0.f) return b;
  const float count = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float b_frac = b.count / count;
  return {count, a.mean + delta * b_frac, a.m2 + b.m2 + delta * delta * a.count * b_frac};
}

// Tree over the warp, then lane 0's result is broadcast: merge() is not bitwise symmetric in its
// arguments, and every lane must normalise with exactly the statistics that get stored.
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const Moments other{__shfl_down_sync(kFullMask, m.count, offset), __shfl_down_sync(kFullMask, m.mean, offset),
                        __shfl_down_sync(kFullMask, m.m2, offset)};
    m = merge(m, other);
  }
  return {__shfl_sync(kFullMask, m.count, 0), __shfl_sync(kFullMask, m.mean, 0), __shfl_sync(kFullMask, m.m2, 0)};
}

// Merge over the row group. A group wider than a warp is the whole block (blockDim.y == 1), so the
// branch and both barriers are block-uniform. Reusing `partial` on the next call is safe without a
// third barrier: slot kWarpSize is only rewritten after every thread has passed the next call's first
// barrier, i.e. after it read this call's result.
__device__ Moments group_merge(Moments m) {
  __shared__ Moments partial[kWarpSize + 1];
  m = warp_merge(m);
  if (blockDim.x == kWarpSize) return m;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) partial[warp] = m;
  __syncthreads();
  if (warp == 0) {
    // The warp count need not be a power of two: missing warps enter as empty sets.
    m = lane < static_cast<int>(blockDim.x / kWarpSize) ? partial[lane] : Moments{0.f, 0.f, 0.f};
    m = warp_merge(m);
    if (lane == 0) partial[kWarpSize] = m;
  }
  __syncthreads();
  return partial[kWarpSize];
}

// Sum of two values over the row group; same structure and reuse argument as group_merge.
__device__ float2 group_sum2(float2 v) {
  __shared__ float2 partial[kWarpSize + 1];
  v.x = cuda::warp_sum(v.x);
  v.y = cuda::warp_sum(v.y);
  if (blockDim.x == kWarpSize) return v;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarpSize) ? partial[lane] : make_float2(0.f, 0.f);
    v.x = cuda::warp_sum(v.x);
    v.y = cuda::warp_sum(v.y);
    if (lane == 0) partial[kWarpSize] = v;
  }
  __syncthreads();
  return partial[kWarpSize];
}

// ---- forward ----------------------------------------------------------------------------------

// Loads this thread's packs of one chunk (packs base + k*threads + tid) into fp32 registers; with a
// residual the value is x + residual rounded to T, also stored to h when h is given. Packs past the
// end of the row read as 0 and are excluded from the statistics by the same index test.
template <typename T, int VEC, int ITERS>
__device__ __forceinline__ void load_input_chunk(float (&v)[ITERS][VEC], const T* __restrict__ x,
                                                 const T* __restrict__ res, T* __restrict__ h, int base,
                                                 int nvec) {
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int p = base + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    if (p < nvec) {
      const Pack<T, VEC> xp = load_pack<T, VEC>(x + static_cast<int64_t>(p) * VEC);
      if (res != nullptr) {
        const Pack<T, VEC> rp = load_pack<T, VEC>(res + static_cast<int64_t>(p) * VEC);
        Pack<T, VEC> hp;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          hp.val[j] = from_float<T>(to_float(xp.val[j]) + to_float(rp.val[j]));
          v[k][j] = to_float(hp.val[j]);
        }
        if (h != nullptr) store_pack<T, VEC>(h + static_cast<int64_t>(p) * VEC, hp);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[k][j] = to_float(xp.val[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[k][j] = 0.f;
    }
  }
}

// Exact two-pass moments of the values this thread holds for one chunk (mean pinned to 0 for RMS).
template <int VEC, int ITERS>
__device__ __forceinline__ Moments thread_moments(const float (&v)[ITERS][VEC], int base, int nvec, bool is_rms) {
  float count = 0.f, sum = 0.f;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    if (base + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x) < nvec) {
      count += VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[k][j];
    }
  }
  const float mean = (is_rms || count == 0.f) ? 0.f : sum / count;
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    if (base + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x) < nvec) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[k][j] - mean;
        m2 += d * d;
      }
    }
  }
  return {count, mean, m2};
}

// Grid: blocks of (threads, rows_per_block); row group = one threadIdx.y slice; rows are strided over
// the grid. CACHED: n <= blockDim.x * ITERS * VEC, so the chunk loops below run exactly once and the
// row never leaves registers.
template <typename T, typename W, int VEC, int ITERS, bool CACHED>
__global__ void __launch_bounds__(kFwdMaxThreads)
    norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual, const W* __restrict__ weight,
                    const W* __restrict__ bias, T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean_out,
                    float* __restrict__ rstd_out, int64_t rows, int n, float eps, bool is_rms) {
  const int nvec = n / VEC;
  const int chunk = ITERS * static_cast<int>(blockDim.x);
  float v[ITERS][VEC];
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t off = row * n;
    const T* xr = x + off;
    const T* rr = residual != nullptr ? residual + off : nullptr;
    T* hr = h != nullptr ? h + off : nullptr;
    T* yr = y + off;

    Moments acc{0.f, 0.f, 0.f};
    for (int base = 0; base < nvec; base += chunk) {
      load_input_chunk<T, VEC, ITERS>(v, xr, rr, hr, base, nvec);
      acc = merge(acc, thread_moments<VEC, ITERS>(v, base, nvec, is_rms));
    }
    acc = group_merge(acc);
    const float mean = acc.mean;
    const float rstd = rsqrtf(acc.m2 / static_cast<float>(n) + eps);
    if (threadIdx.x == 0) {
      if (!is_rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

    for (int base = 0; base < nvec; base += chunk) {
      if constexpr (!CACHED) {
        // Recompute h = x + residual (bitwise the same) rather than read back the h this kernel
        // wrote: nvcc turns every load here into ld.global.nc, which is undefined for data written
        // during the kernel. Only x and residual, which nothing writes, are ever read.
        load_input_chunk<T, VEC, ITERS>(v, xr, rr, nullptr, base, nvec);
      }
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        const int p = base + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
        if (p >= nvec) continue;
        const int64_t e = static_cast<int64_t>(p) * VEC;
        const Pack<W, VEC> wp = load_pack<W, VEC>(weight + e);
        Pack<T, VEC> out;
        if (bias != nullptr) {
          const Pack<W, VEC> bp = load_pack<W, VEC>(bias + e);
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            out.val[j] = from_float<T>((v[k][j] - mean) * rstd * to_float(wp.val[j]) + to_float(bp.val[j]));
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) out.val[j] = from_float<T>((v[k][j] - mean) * rstd * to_float(wp.val[j]));
        }
        store_pack<T, VEC>(yr + e, out);
      }
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------

// Row group g = blockIdx.x * blockDim.y + threadIdx.y handles rows [g * rows_per_group, ...) and
// owns row g of dw_part / db_part (fp32, (groups, n)). CACHED: the group's columns fit in registers,
// so the partials are accumulated there over all its rows and written once at the end (a group with
// no rows writes zeros). Otherwise each row's contribution is added to the group's partial row in
// global memory (zero-initialised by the launcher); a thread only ever touches its own columns there.
template <typename T, typename W, int VEC, int ITERS, bool CACHED>
__global__ void __launch_bounds__(kBwdMaxThreads)
    norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h,
                    const W* __restrict__ weight, const float* __restrict__ mean, const float* __restrict__ rstd,
                    T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part, int64_t rows, int n,
                    int64_t rows_per_group, bool is_rms) {
  const int tid = threadIdx.x, threads = blockDim.x;
  const int nvec = n / VEC;
  const int chunk = ITERS * threads;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t row_begin = group * rows_per_group;
  const int64_t row_end = std::min(rows, row_begin + rows_per_group);
  float* dwp = dw_part + group * n;
  float* dbp = db_part != nullptr ? db_part + group * n : nullptr;

  float hat[ITERS][VEC], g[ITERS][VEC];
  float dw_acc[ITERS][VEC] = {}, db_acc[ITERS][VEC] = {};
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t off = row * n;
    const float mu = is_rms ? 0.f : mean[row];
    const float rs = rstd[row];

    // Pass 1: xhat, dy, the two row sums and the dweight/dbias contributions.
    float2 c = make_float2(0.f, 0.f);  // (sum xhat*w*dy, sum w*dy)
    for (int base = 0; base < nvec; base += chunk) {
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        const int p = base + k * threads + tid;
        if (p >= nvec) continue;
        const int64_t e = static_cast<int64_t>(p) * VEC;
        const Pack<T, VEC> hp = load_pack<T, VEC>(h + off + e);
        const Pack<T, VEC> gp = load_pack<T, VEC>(dy + off + e);
        const Pack<W, VEC> wp = load_pack<W, VEC>(weight + e);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          hat[k][j] = (to_float(hp.val[j]) - mu) * rs;
          g[k][j] = to_float(gp.val[j]);
          const float wdy = g[k][j] * to_float(wp.val[j]);
          c.x += hat[k][j] * wdy;
          c.y += wdy;
        }
        if constexpr (CACHED) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            dw_acc[k][j] += g[k][j] * hat[k][j];
            db_acc[k][j] += g[k][j];
          }
        } else {
          Pack<float, VEC> acc = load_pack<float, VEC>(dwp + e);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc.val[j] += g[k][j] * hat[k][j];
          store_pack<float, VEC>(dwp + e, acc);
          if (dbp != nullptr) {
            acc = load_pack<float, VEC>(dbp + e);
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc.val[j] += g[k][j];
            store_pack<float, VEC>(dbp + e, acc);
          }
        }
      }
    }
    c = group_sum2(c);
    const float c1 = c.x / static_cast<float>(n);
    const float c2 = is_rms ? 0.f : c.y / static_cast<float>(n);

    // Pass 2: dx from the cached (or re-read) xhat and dy.
    for (int base = 0; base < nvec; base += chunk) {
#pragma unroll
      for (int k = 0; k < ITERS; ++k) {
        const int p = base + k * threads + tid;
        if (p >= nvec) continue;
        const int64_t e = static_cast<int64_t>(p) * VEC;
        if constexpr (!CACHED) {
          const Pack<T, VEC> hp = load_pack<T, VEC>(h + off + e);
          const Pack<T, VEC> gp = load_pack<T, VEC>(dy + off + e);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            hat[k][j] = (to_float(hp.val[j]) - mu) * rs;
            g[k][j] = to_float(gp.val[j]);
          }
        }
        const Pack<W, VEC> wp = load_pack<W, VEC>(weight + e);
        Pack<T, VEC> out;
        if (dh != nullptr) {
          const Pack<T, VEC> dhp = load_pack<T, VEC>(dh + off + e);
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            out.val[j] = from_float<T>((g[k][j] * to_float(wp.val[j]) - hat[k][j] * c1 - c2) * rs +
                                       to_float(dhp.val[j]));
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            out.val[j] = from_float<T>((g[k][j] * to_float(wp.val[j]) - hat[k][j] * c1 - c2) * rs);
        }
        store_pack<T, VEC>(dx + off + e, out);
      }
    }
  }

  if constexpr (CACHED) {
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      const int p = k * threads + tid;
      if (p >= nvec) continue;
      const int64_t e = static_cast<int64_t>(p) * VEC;
      Pack<float, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.val[j] = dw_acc[k][j];
      store_pack<float, VEC>(dwp + e, out);
      if (dbp != nullptr) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.val[j] = db_acc[k][j];
        store_pack<float, VEC>(dbp + e, out);
      }
    }
  }
}

// dweight[c] = sum over groups of dw_part[:, c] (and dbias likewise), cast to W. Block (32, 16): a
// warp reads 32 consecutive columns of one partial row (coalesced), the 16 slices stride over the
// groups, and the slices are added in a fixed order, so the result is deterministic.
template <typename W>
__global__ void __launch_bounds__(kReduceCols* kReduceSlices)
    reduce_partials_kernel(const float* __restrict__ dw_part, const float* __restrict__ db_part, W* __restrict__ dw,
                           W* __restrict__ db, int64_t groups, int n) {
  __shared__ float s_dw[kReduceSlices][kReduceCols + 1];
  __shared__ float s_db[kReduceSlices][kReduceCols + 1];
  const int col = blockIdx.x * kReduceCols + threadIdx.x;
  float a = 0.f, b = 0.f;
  if (col < n) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < groups; r += kReduceSlices) {
      a += dw_part[r * n + col];
      if (db_part != nullptr) b += db_part[r * n + col];
    }
  }
  s_dw[threadIdx.y][threadIdx.x] = a;
  s_db[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    a = 0.f;
    b = 0.f;
#pragma unroll
    for (int s = 0; s < kReduceSlices; ++s) {
      a += s_dw[s][threadIdx.x];
      b += s_db[s][threadIdx.x];
    }
    dw[col] = from_float<W>(a);
    if (db != nullptr) db[col] = from_float<W>(b);
  }
}

// ---- launchers --------------------------------------------------------------------------------

// Threads per row group and rows per block for a row of n elements in packs of VEC, when each thread
// holds ITERS packs. Rows that fit get just enough warps to cover them (one warp and several rows per
// block for short rows); longer rows get the widest block and the chunked path.
struct LaunchShape {
  int threads;
  int rows_per_block;
  bool cached;
};

LaunchShape pick_shape(int64_t n, int vec, int iters, int max_threads) {
  const int64_t nvec = n / vec;
  if (nvec > static_cast<int64_t>(max_threads) * iters) return {max_threads, 1, false};
  const int threads = static_cast<int>(ceil_div<int64_t>(ceil_div<int64_t>(nvec, iters), kWarpSize) * kWarpSize);
  return {threads, threads == kWarpSize ? kRowsPerWarpBlock : 1, true};
}

// The 16-byte pack width in elements of T, and the alignment that packs of W of the same length need.
template <typename T>
constexpr int pack_width() {
  return 16 / static_cast<int>(sizeof(T));
}
template <typename T, typename W>
constexpr int weight_pack_align() {
  return std::min<int>(16, pack_width<T>() * static_cast<int>(sizeof(W)));
}

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

// T is x's dtype, W the weight's (T or fp32). The cases are AT_DISPATCH_FLOATING_TYPES_AND2's
// minus double: the argument checks reject float64 before dispatch, and instantiating it would compile
// a fifth of the kernels for nothing (an `if constexpr` inside the dispatch lambda cannot prevent that,
// the lambda is not a template).
#define PLM_DISPATCH_NORM_CASE(ST, WT, ...)   \
  AT_DISPATCH_CASE(ST, [&] {                  \
    using T = scalar_t;                       \
    if ((WT) == at::kFloat) {                 \
      using W = float;                        \
      __VA_ARGS__();                          \
    } else {                                  \
      using W = T;                            \
      __VA_ARGS__();                          \
    }                                         \
  })
#define PLM_DISPATCH_NORM_TYPES(XT, WT, NAME, ...)                         \
  AT_DISPATCH_SWITCH(XT, NAME,                                             \
                     PLM_DISPATCH_NORM_CASE(at::kFloat, WT, __VA_ARGS__)    \
                     PLM_DISPATCH_NORM_CASE(at::kHalf, WT, __VA_ARGS__)     \
                     PLM_DISPATCH_NORM_CASE(at::kBFloat16, WT, __VA_ARGS__))

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                         const std::optional<Tensor>& bias,
                                                         const std::optional<Tensor>& residual, double eps,
                                                         bool is_rms) {
  check_norm_fwd_args(x, weight, bias, residual, eps);
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

}  // namespace plm_engine
