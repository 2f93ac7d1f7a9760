// Paged decode attention and the KV-cache write, the kernels of paged_attention.cu (kernel headers:
// cuda/common.cuh).
#pragma once

#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/write_params.h"

namespace plm_engine {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxSplits = 64;
constexpr int kMinSplitTokens = 256;
constexpr int kBlocksPerSm = 4;
constexpr int kVec = 8;  // elements per 16-byte load of a 16-bit K/V row
constexpr float kLog2e = 1.4426950408889634f;
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
  // T5's relative position bias, or nullptr: per head, 2 * max_distance + 1 fp32 values in log2 units,
  // bias[h * (2 * max_distance + 1) + max_distance + r] for key - query position r, clamped to
  // [-max_distance, max_distance] (plm_engine/ops/position_bias.py).
  const float* bias = nullptr;
  int max_distance = 0;
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
    // The own row's bias at relative position 0 (its query's position is own_last_key).
    const float* own_bias = p.bias != nullptr && own < rows_here
                                ? p.bias + static_cast<int64_t>(kvh * p.group + (row0 + own) % p.group) *
                                               (2 * p.max_distance + 1) + p.max_distance
                                : nullptr;

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
        const bool visible = t <= own_last_key && t < end;
        s_own[u] = visible ? dot : kNegInf;
        if (own_bias != nullptr && visible)
          s_own[u] += own_bias[max(t - own_last_key, -p.max_distance)];  // t <= own_last_key: r <= 0
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

// ---- write_kv_cache (WriteParams: cuda/write_params.h) -------------------------------------------------

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

}  // namespace
}  // namespace plm_engine
