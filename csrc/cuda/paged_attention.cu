// Decode attention over the paged KV cache (flash-decoding), and the KV-cache write, on CUDA.
// Contract: plm_engine/ops/attention.py's module docstring; argument checks: csrc/attention_ops.cpp.
//
// paged_attn is bound by reading K and V once, so the layout is built around those reads.
//
// Grid (batch, n_kv_heads * row_tiles, num_splits), 4 warps per block. A block owns the query rows of
// one kv head: row m = (query token m / group, query head kvh * group + m % group), ROWS of them
// (1, 4 or 8: template), so every K/V row it loads serves all the query heads of its GQA group. Groups
// larger than 8 rows (MQA, speculative tokens) take several row tiles, each re-reading the keys.
//
// Keys. Token t of sequence b lives in physical block block_table[b][t >> log2(block_size)], slot
// t & (block_size - 1). A K or V row of head_dim 16-bit values is read by LANES = head_dim / 8 lanes,
// one 16-byte load each (head_dim 128: 16 lanes x 16 B = 256 B), so a warp covers 32 / LANES tokens per
// step and UNROLL steps per iteration; the next iteration's K/V loads are issued before the current
// one is computed, which keeps 2 x UNROLL x 2 loads of 16 B in flight per lane. head_dim is padded to a
// power of two D in {64, 128, 256}; the lanes past the real head_dim (a multiple of 8, so a 16-byte
// pack is wholly in or out) load nothing.
//
// Scores and softmax. A lane multiplies its 8 K values with the same 8 dims of every query row (fp32
// FMAs); the ROWS partial dots are then summed over the lane group by a reduce-scatter (each halving
// step keeps half of the rows and swaps the other half with the partner lane), after which lane l of
// a group holds the finished score of its "own" row (l % LANES) / (LANES / ROWS). The own row's online
// softmax (max, sum, in base 2: q is pre-scaled by scale * log2(e)) runs once per UNROLL tokens, and
// the lane broadcasts its probabilities and rescale factor to the group, where every lane updates the
// 8-dim fp32 accumulators of all rows with its V values. Against a butterfly per row this cuts the
// shuffles and the exp2s per token by 2-8x for ROWS = 4 and 8, which matters as the kernel must issue
// its arithmetic within the time HBM takes to deliver a K/V row. The lane groups of a warp merge with
// shuffles, the warps through shared memory. A row with no visible key keeps max = -inf and subtracts
// 0 instead, so exp2 gives 0, never NaN.
//
// Splits. The keys of sequence b are cut into num_splits equal ranges (whole block iterations). With
// one split the block writes the output; otherwise it writes its normalised partial output and
// log2-sum-exp (fp32, -inf for a split that saw no key) and a merge kernel combines them, giving an
// empty split weight exactly 0. num_splits is chosen so that batch * kv heads * row tiles * splits
// fills the GPU (~4 blocks per SM), with at least 256 keys of block-table capacity per split.
// Causal, bottom-right: query i sees keys t <= seqlen - seqlen_q + i; a block stops after the last key
// its last query sees.
//
// write_kv_cache: one warp per token copies its (n_kv_heads, head_dim) K and V rows to flat slot
// slot_mapping[t] (block * block_size + offset), 8 elements (16 or 32 bytes) per lane and access when
// everything is 16-byte aligned, else element by element; conversion to the cache dtype on the way.
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "attention.h"
#include "cuda/common.cuh"

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

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxSplits = 64;
constexpr int kMinSplitTokens = 256;
constexpr int kBlocksPerSm = 4;
constexpr int kVec = 8;  // elements per 16-byte load of a 16-bit K/V row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Test-only: forces the number of KV splits (the Triton backend reads the same variable).
constexpr const char* kSplitsEnv = "PLM_ENGINE_PAGED_ATTN_SPLITS";

struct PagedParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int* block_table;
  const int* cache_seqlens;
  void* out;          // (batch, seqlen_q, n_heads, head_dim), contiguous
  float* part_out;    // (batch, seqlen_q, n_heads, num_splits, head_dim) when num_splits > 1
  float* part_lse;    // (batch, seqlen_q, n_heads, num_splits), log2 units
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t cache_stride_block, cache_stride_slot;  // elements; the head stride is head_dim
  int64_t bt_stride;
  int seqlen_q, n_heads, group, n_rows, row_tiles, head_dim, page_shift, num_splits;
  float scale_log2;
};

// Sum over aligned groups of WIDTH lanes; every lane of a group gets the same bits.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// The reference point of an online softmax: the max, or 0 while nothing was seen (max = -inf), so that
// exp2(x - ref) is 0 for x = -inf instead of exp2(-inf + inf) = NaN.
__device__ __forceinline__ float softmax_ref(float m) { return m == kNegInf ? 0.f : m; }

// 8 packed 16-bit values -> fp32, from the raw bits: bf16 is the top half of an fp32, and half2 has a
// two-wide hardware conversion. Keeps the unpacking in registers for every instantiation.
__device__ __forceinline__ void unpack8(const Pack<at::BFloat16, kVec>& pk, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(&pk);
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack8(const Pack<at::Half, kVec>& pk, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(&pk);
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T, int D, int ROWS>
struct SplitKernel {
  static constexpr int kLanes = D / kVec;                // lanes per K/V row
  static constexpr int kTokensPerStep = kWarpSize / kLanes;
  static constexpr int kUnroll = ROWS >= 8 ? 2 : 4;      // 8 rows hold 2 x 64 fp32 of q and acc already
  static constexpr int kWarpTokens = kTokensPerStep * kUnroll;
  static constexpr int kBlockTokens = kWarps * kWarpTokens;
  static constexpr int kLanesPerRow = kLanes / ROWS;     // lanes that finish each row's score
  static_assert(kLanes >= 1 && kLanes <= kWarpSize && kWarpSize % kLanes == 0, "D must be 8..256, power of 2");
  static_assert(kLanes % ROWS == 0, "a lane group must be able to own every row");
  static_assert(sizeof(T) == 2, "16-bit K/V only");

  struct Tile {
    Pack<T, kVec> k[kUnroll];
    Pack<T, kVec> v[kUnroll];
  };

  // Loads the K/V packs of tokens t0 + u * kTokensPerStep + sub (zeros past `end` or past head_dim).
  static __device__ __forceinline__ void load(Tile& tile, const PagedParams& p, const int* bt_row, const T* k_head,
                                              const T* v_head, int t0, int end, int sub, bool dim_ok) {
    const int page_mask = (1 << p.page_shift) - 1;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * kTokensPerStep + sub;
      if (dim_ok && t < end) {
        const int64_t block = bt_row[t >> p.page_shift];
        const int64_t off = block * p.cache_stride_block + static_cast<int64_t>(t & page_mask) * p.cache_stride_slot;
        tile.k[u] = load_pack<T, kVec>(k_head + off);
        tile.v[u] = load_pack<T, kVec>(v_head + off);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          tile.k[u].val[j] = from_float<T>(0.f);
          tile.v[u].val[j] = from_float<T>(0.f);
        }
      }
    }
  }

  // Sums each row's partial dot over the lane group and returns the finished score of the lane's own
  // row, (lane % kLanes) / kLanesPerRow. Reduce-scatter: at each halving step a lane keeps half of its
  // rows and swaps the other half with its partner, so ROWS rows cost ROWS - 1 + log2(kLanesPerRow)
  // shuffles instead of ROWS * log2(kLanes); the lanes of a row then end with the same bits.
  static __device__ __forceinline__ float reduce_rows(float (&v)[ROWS], int lane) {
#pragma unroll
    for (int n = ROWS, offset = kLanes / 2; n > 1; n >>= 1, offset >>= 1) {
      const bool upper = lane & offset;  // keeps the second half of the current rows
#pragma unroll
      for (int i = 0; i < n / 2; ++i) {
        const float send = upper ? v[i] : v[i + n / 2];
        const float keep = upper ? v[i + n / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, offset);
      }
    }
    float x = v[0];
#pragma unroll
    for (int offset = kLanesPerRow / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
    return x;
  }

  // Row r's value of a per-row quantity that the lanes owning row r hold (ROWS == 1: every lane does).
  static __device__ __forceinline__ float from_owner(float v, int group_base, int r) {
    return ROWS == 1 ? v : __shfl_sync(kFullMask, v, group_base + r * kLanesPerRow);
  }

  static __device__ void run(const PagedParams& p) {
    __shared__ float s_max[kWarps][ROWS];
    __shared__ float s_sum[kWarps][ROWS];
    __shared__ float s_acc[kWarps][ROWS][D];

    const int b = blockIdx.x;
    const int kvh = blockIdx.y / p.row_tiles;
    const int row0 = (blockIdx.y % p.row_tiles) * ROWS;
    const int split = blockIdx.z;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int sub = lane / kLanes;              // which token of a warp step
    const int group_base = sub * kLanes;        // first lane of this token's lane group
    const int dim0 = (lane % kLanes) * kVec;    // first of this lane's 8 dims
    const int own = (lane % kLanes) / kLanesPerRow;  // the row whose softmax state this lane keeps
    const bool dim_ok = dim0 < p.head_dim;
    const int rows_here = min(ROWS, p.n_rows - row0);
    const int seqlen = p.cache_seqlens[b];

    // Query rows: the scaled q slice of every row in registers (a lane multiplies all rows by its K
    // values); the last key the own row sees (-1 for a padding row: none).
    float q[ROWS][kVec];
    const T* q_base = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_stride_b + dim0;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = row0 + r;
      const int qi = row / p.group;
      const int head = kvh * p.group + row % p.group;
      const bool ok = r < rows_here && dim_ok;
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        q[r][j] = ok ? to_float(q_base[qi * p.q_stride_s + head * p.q_stride_h + j]) * p.scale_log2 : 0.f;
    }
    const int own_last_key = own < rows_here ? seqlen - p.seqlen_q + (row0 + own) / p.group : -1;

    // This split's keys, cut after the last key the block's last query sees.
    const int last_qi = (row0 + rows_here - 1) / p.group;
    const int per_split = ceil_div(ceil_div(max(seqlen, 0), p.num_splits), kBlockTokens) * kBlockTokens;
    const int start = split * per_split;
    const int end = min(start + per_split, seqlen - p.seqlen_q + last_qi + 1);

    // Online softmax: max and sum of the own row, accumulators of every row for this lane's dims.
    float m_own = kNegInf, l_own = 0.f;
    float acc[ROWS][kVec];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[r][j] = 0.f;

    const int* bt_row = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
    const int64_t head_off = static_cast<int64_t>(kvh) * p.head_dim + dim0;
    const T* k_head = static_cast<const T*>(p.k_cache) + head_off;
    const T* v_head = static_cast<const T*>(p.v_cache) + head_off;

    Tile cur;
    int t0 = start + warp * kWarpTokens;
    load(cur, p, bt_row, k_head, v_head, t0, end, sub, dim_ok);
    // The loop bound is block-uniform (start and end are), so every lane of a warp runs the same
    // iterations and the shuffles below are never divergent.
    for (int base = start; base < end; base += kBlockTokens, t0 += kBlockTokens) {
      Tile next;
      load(next, p, bt_row, k_head, v_head, t0 + kBlockTokens, end, sub, dim_ok);

      float s_own[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float kf[kVec];
        unpack8(cur.k[u], kf);
        float dots[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          dots[r] = 0.f;
#pragma unroll
          for (int j = 0; j < kVec; ++j) dots[r] = fmaf(q[r][j], kf[j], dots[r]);
        }
        const float dot = reduce_rows(dots, lane);
        const int t = t0 + u * kTokensPerStep + sub;
        // t < end matters when the split ends before the row's last visible key.
        s_own[u] = (t <= own_last_key && t < end) ? dot : kNegInf;
      }
      float mx = m_own;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s_own[u]);
      const float ref = softmax_ref(mx);
      const float alpha_own = exp2f(m_own - ref);
      float p_own[kUnroll];
      float p_sum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        p_own[u] = exp2f(s_own[u] - ref);
        p_sum += p_own[u];
      }
      l_own = l_own * alpha_own + p_sum;
      m_own = mx;

#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float alpha = from_owner(alpha_own, group_base, r);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[r][j] *= alpha;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float vf[kVec];
        unpack8(cur.v[u], vf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float pr = from_owner(p_own[u], group_base, r);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[r][j] = fmaf(pr, vf[j], acc[r][j]);
        }
      }
      cur = next;
    }

    // Merge the lane groups of the warp (same dims and own row, different tokens): xor over the token
    // bits; each row's rescale factors come from its owner lanes.
#pragma unroll
    for (int offset = kLanes; offset < kWarpSize; offset <<= 1) {
      const float m_o = __shfl_xor_sync(kFullMask, m_own, offset);
      const float l_o = __shfl_xor_sync(kFullMask, l_own, offset);
      const float mx = fmaxf(m_own, m_o);
      const float ref = softmax_ref(mx);
      const float a_own = exp2f(m_own - ref), c_own = exp2f(m_o - ref);
      l_own = l_own * a_own + l_o * c_own;
      m_own = mx;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float a = from_owner(a_own, group_base, r), c = from_owner(c_own, group_base, r);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[r][j] = acc[r][j] * a + __shfl_xor_sync(kFullMask, acc[r][j], offset) * c;
      }
    }
    if (sub == 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int j = 0; j < kVec; ++j) s_acc[warp][r][dim0 + j] = acc[r][j];
      if (lane % kLanesPerRow == 0) {
        s_max[warp][own] = m_own;
        s_sum[warp][own] = l_own;
      }
    }
    __syncthreads();

    // Merge the warps: thread -> (row, dim), consecutive threads on consecutive dims (coalesced stores).
    for (int idx = threadIdx.x; idx < rows_here * p.head_dim; idx += kThreads) {
      const int r = idx / p.head_dim, d = idx % p.head_dim;
      float mx = kNegInf;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_max[w][r]);
      const float ref = softmax_ref(mx);
      float sum = 0.f, o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float c = exp2f(s_max[w][r] - ref);
        sum = fmaf(s_sum[w][r], c, sum);
        o = fmaf(s_acc[w][r][d], c, o);
      }
      o = sum > 0.f ? o / sum : 0.f;
      const int row = row0 + r;
      const int64_t out_row =
          (static_cast<int64_t>(b) * p.seqlen_q + row / p.group) * p.n_heads + kvh * p.group + row % p.group;
      if (p.num_splits == 1) {
        static_cast<T*>(p.out)[out_row * p.head_dim + d] = from_float<T>(o);
      } else {
        const int64_t part = out_row * p.num_splits + split;
        p.part_out[part * p.head_dim + d] = o;
        if (d == 0) p.part_lse[part] = sum > 0.f ? mx + log2f(sum) : kNegInf;
      }
    }
  }
};

template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(kThreads) paged_attn_split_kernel(const PagedParams p) {
  SplitKernel<T, D, ROWS>::run(p);
}

// One warp per output row r = (b * seqlen_q + i) * n_heads + h: weights exp2(lse_s - max) per split
// (exactly 0 for an empty split, whose partial is then not read), normalised sum of the partials.
template <typename T>
__global__ void __launch_bounds__(kThreads) paged_attn_combine_kernel(const float* __restrict__ part_out,
                                                                      const float* __restrict__ part_lse,
                                                                      T* __restrict__ out, int64_t n_out_rows,
                                                                      int num_splits, int head_dim) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= n_out_rows) return;  // whole warp: no block-wide sync below
  const float* lse = part_lse + r * num_splits;
  float mx = kNegInf;
  for (int s = lane; s < num_splits; s += kWarpSize) mx = fmaxf(mx, lse[s]);
  const float ref = softmax_ref(warp_max(mx));
  float sum = 0.f;
  for (int s = lane; s < num_splits; s += kWarpSize) sum += exp2f(lse[s] - ref);
  sum = cuda::warp_sum(sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const float* part = part_out + r * num_splits * head_dim;
  for (int d = lane; d < head_dim; d += kWarpSize) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lse[s] - ref);
      if (w != 0.f) o = fmaf(w, part[static_cast<int64_t>(s) * head_dim + d], o);
    }
    out[r * head_dim + d] = from_float<T>(o * inv);
  }
}

int splits_from_env() {
  const char* env = std::getenv(kSplitsEnv);
  if (env == nullptr || *env == '\0') return 0;
  const int n = std::atoi(env);
  return n < 1 ? 1 : (n > kMaxSplits ? kMaxSplits : n);
}

template <typename T, int D, int ROWS>
void launch_split(const PagedParams& p, dim3 grid, cudaStream_t stream) {
  paged_attn_split_kernel<T, D, ROWS><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_split_rows(const PagedParams& p, int rows, dim3 grid, cudaStream_t stream) {
  if (rows == 1) {
    launch_split<T, D, 1>(p, grid, stream);
  } else if (rows == 4) {
    launch_split<T, D, 4>(p, grid, stream);
  } else {
    launch_split<T, D, 8>(p, grid, stream);
  }
}

template <typename T>
void launch_paged(const PagedParams& p, int rows, dim3 grid, int64_t n_out_rows, cudaStream_t stream) {
  if (p.head_dim <= 64) {
    launch_split_rows<T, 64>(p, rows, grid, stream);
  } else if (p.head_dim <= 128) {
    launch_split_rows<T, 128>(p, rows, grid, stream);
  } else {
    launch_split_rows<T, 256>(p, rows, grid, stream);
  }
  if (p.num_splits > 1) {
    const dim3 cgrid(static_cast<unsigned>(ceil_div<int64_t>(n_out_rows, kWarps)));
    paged_attn_combine_kernel<T><<<cgrid, kThreads, 0, stream>>>(p.part_out, p.part_lse, static_cast<T*>(p.out),
                                                                 n_out_rows, p.num_splits, p.head_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- write_kv_cache --------------------------------------------------------------------------------

struct WriteParams {
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  const void* slots;
  bool slots_int64;
  int64_t n_tokens, k_stride_t, k_stride_h, v_stride_t, v_stride_h;
  int n_kv_heads, head_dim;
};

// One warp per token; VEC consecutive elements of one head per lane and access (VEC divides head_dim).
template <typename Tin, typename Tout, int VEC>
__global__ void __launch_bounds__(kThreads) write_kv_cache_kernel(const WriteParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (t >= p.n_tokens) return;
  const int64_t slot = p.slots_int64 ? static_cast<const int64_t*>(p.slots)[t] : static_cast<const int*>(p.slots)[t];
  if (slot < 0) return;  // padding token
  const int row = p.n_kv_heads * p.head_dim;
  const int64_t dst = slot * row;
  for (int e = lane * VEC; e < row; e += kWarpSize * VEC) {
    const int h = e / p.head_dim, d = e % p.head_dim;
    const Tin* ks = static_cast<const Tin*>(p.k) + t * p.k_stride_t + h * p.k_stride_h + d;
    const Tin* vs = static_cast<const Tin*>(p.v) + t * p.v_stride_t + h * p.v_stride_h + d;
    const Pack<Tin, VEC> kin = load_pack<Tin, VEC>(ks), vin = load_pack<Tin, VEC>(vs);
    Pack<Tout, VEC> kout, vout;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      kout.val[j] = from_float<Tout>(to_float(kin.val[j]));
      vout.val[j] = from_float<Tout>(to_float(vin.val[j]));
    }
    store_pack<Tout, VEC>(static_cast<Tout*>(p.k_cache) + dst + e, kout);
    store_pack<Tout, VEC>(static_cast<Tout*>(p.v_cache) + dst + e, vout);
  }
}

// Calls fn with a value of the C++ type of dtype (float32, float16 or bfloat16: what the checks allow).
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "write_kv_cache (CUDA): unsupported dtype ", dtype);
  }
}

}  // namespace

Tensor paged_attn_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                       const Tensor& cache_seqlens, double scale) {
  check_paged_args(q, k_cache, v_cache, block_table, cache_seqlens);
  TORCH_CHECK(q.is_cuda(), "paged_attn_cuda: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "paged_attn (CUDA) takes float16/bfloat16, got ", q.scalar_type());
  const int64_t batch = q.size(0), seqlen_q = q.size(1), n_heads = q.size(2), head_dim = q.size(3);
  const int64_t block_size = k_cache.size(1), n_kv_heads = k_cache.size(2);
  TORCH_CHECK(cuda::is_aligned(k_cache.data_ptr(), 16) && cuda::is_aligned(v_cache.data_ptr(), 16),
              "paged_attn (CUDA): k_cache and v_cache must start 16-byte aligned");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;

  const int64_t group = n_heads / n_kv_heads;
  const int64_t n_rows = group * seqlen_q;
  const int rows = n_rows == 1 ? 1 : (n_rows <= 4 ? 4 : 8);
  const int64_t row_tiles = ceil_div<int64_t>(n_rows, rows);
  TORCH_CHECK(n_kv_heads * row_tiles <= 65535, "paged_attn (CUDA): n_kv_heads * ceil(group * seqlen_q / 8) = ",
              n_kv_heads * row_tiles, " exceeds the grid limit 65535");
  TORCH_CHECK(batch <= std::numeric_limits<int>::max(), "paged_attn (CUDA): batch too large: ", batch);

  int num_splits = splits_from_env();
  if (num_splits == 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = batch * n_kv_heads * row_tiles;
    const int64_t want = ceil_div<int64_t>(static_cast<int64_t>(sms) * kBlocksPerSm, blocks);
    const int64_t by_length = ceil_div<int64_t>(block_table.size(1) * block_size, kMinSplitTokens);
    num_splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, by_length, kMaxSplits})));
  }
  Tensor part_out, part_lse;
  if (num_splits > 1) {
    part_out = at::empty({batch, seqlen_q, n_heads, num_splits, head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({batch, seqlen_q, n_heads, num_splits}, q.options().dtype(at::kFloat));
  }

  PagedParams p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_table = block_table.data_ptr<int>();
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.out = out.data_ptr();
  p.part_out = num_splits > 1 ? part_out.data_ptr<float>() : nullptr;
  p.part_lse = num_splits > 1 ? part_lse.data_ptr<float>() : nullptr;
  p.q_stride_b = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.cache_stride_block = k_cache.stride(0);
  p.cache_stride_slot = k_cache.stride(1);
  p.bt_stride = block_table.stride(0);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.n_heads = static_cast<int>(n_heads);
  p.group = static_cast<int>(group);
  p.n_rows = static_cast<int>(n_rows);
  p.row_tiles = static_cast<int>(row_tiles);
  p.head_dim = static_cast<int>(head_dim);
  p.page_shift = 0;
  while ((int64_t{1} << p.page_shift) < block_size) ++p.page_shift;
  p.num_splits = num_splits;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(n_kv_heads * row_tiles),
                  static_cast<unsigned>(num_splits));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kHalf) {
    launch_paged<at::Half>(p, rows, grid, batch * seqlen_q * n_heads, stream);
  } else {
    launch_paged<at::BFloat16>(p, rows, grid, batch * seqlen_q * n_heads, stream);
  }
  return out;
}

void write_kv_cache_cuda(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache,
                         const Tensor& slot_mapping) {
  check_write_kv_args(k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k_cache.is_cuda(), "write_kv_cache_cuda: the caches must be CUDA tensors, got ", k_cache.device());
  const int64_t n_tokens = k.size(0), n_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  if (n_tokens == 0 || n_kv_heads * head_dim == 0) return;
  TORCH_CHECK(n_kv_heads * head_dim <= std::numeric_limits<int>::max() / 2, "write_kv_cache (CUDA): rows of ",
              n_kv_heads * head_dim, " elements are too long");
  const c10::cuda::CUDAGuard guard(k_cache.device());

  WriteParams p;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slots = slot_mapping.data_ptr();
  p.slots_int64 = slot_mapping.scalar_type() == at::kLong;
  p.n_tokens = n_tokens;
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.n_kv_heads = static_cast<int>(n_kv_heads);
  p.head_dim = static_cast<int>(head_dim);

  // 8-wide packs need head_dim, the k/v strides and every base address to keep them 16-byte aligned
  // (an fp32 side moves 32 bytes per pack: two aligned 16-byte accesses).
  const bool packed = head_dim % 8 == 0 && p.k_stride_t % 8 == 0 && p.k_stride_h % 8 == 0 &&
                      p.v_stride_t % 8 == 0 && p.v_stride_h % 8 == 0 && cuda::is_aligned(p.k, 16) &&
                      cuda::is_aligned(p.v, 16) && cuda::is_aligned(p.k_cache, 16) &&
                      cuda::is_aligned(p.v_cache, 16);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(n_tokens, kWarps)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(k.scalar_type(), [&](auto in_tag) {
    using Tin = decltype(in_tag);
    dispatch_float(k_cache.scalar_type(), [&](auto out_tag) {
      using Tout = decltype(out_tag);
      if (packed) {
        write_kv_cache_kernel<Tin, Tout, 8><<<grid, kThreads, 0, stream>>>(p);
      } else {
        write_kv_cache_kernel<Tin, Tout, 1><<<grid, kThreads, 0, stream>>>(p);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CUDA, m) {
  m.impl("paged_attn", &plm_engine::paged_attn_cuda);
  m.impl("write_kv_cache", &plm_engine::write_kv_cache_cuda);
}
