// The norm kernels of norms.cu (design notes there) and their launch geometry (kernel headers:
// cuda/common.cuh).
#pragma once

#include "cuda/common.cuh"

namespace plm_engine {
namespace {

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

// Calls f(k, e) for this thread's packs of the chunk that starts at pack `base` (packs base + k*threads
// + tid, k < ITERS) that lie inside the row of nvec packs; e is the pack's first element. The loop is
// unrolled, so k is a constant in each inlined f and per-pack arrays indexed by k stay in registers.
template <int VEC, int ITERS, typename F>
__device__ __forceinline__ void for_each_chunk_pack(int base, int nvec, F&& f) {
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int p = base + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    if (p < nvec) f(k, static_cast<int64_t>(p) * VEC);
  }
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
      for_each_chunk_pack<VEC, ITERS>(base, nvec, [&](int k, int64_t e) {
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
      });
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
  const int nvec = n / VEC;
  const int chunk = ITERS * static_cast<int>(blockDim.x);
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
      for_each_chunk_pack<VEC, ITERS>(base, nvec, [&](int k, int64_t e) {
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
      });
    }
    c = group_sum2(c);
    const float c1 = c.x / static_cast<float>(n);
    const float c2 = is_rms ? 0.f : c.y / static_cast<float>(n);

    // Pass 2: dx from the cached (or re-read) xhat and dy.
    for (int base = 0; base < nvec; base += chunk) {
      for_each_chunk_pack<VEC, ITERS>(base, nvec, [&](int k, int64_t e) {
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
      });
    }
  }

  if constexpr (CACHED) {
    for_each_chunk_pack<VEC, ITERS>(0, nvec, [&](int k, int64_t e) {
      Pack<float, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.val[j] = dw_acc[k][j];
      store_pack<float, VEC>(dwp + e, out);
      if (dbp != nullptr) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.val[j] = db_acc[k][j];
        store_pack<float, VEC>(dbp + e, out);
      }
    });
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

// ---- launch geometry (host code, shared with the emulated launchers of the tests) -------------------

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

}  // namespace
}  // namespace plm_engine
