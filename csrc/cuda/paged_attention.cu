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
#include "common/dispatch.h"
#include "common/register.h"
#include "cuda/paged_attention_kernels.cuh"
#include "cuda/write_kv_params.h"

namespace plm_engine {
namespace {

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

Tensor paged_attn_impl(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                       const Tensor& cache_seqlens, double scale, const Tensor* bias_rows) {
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
  if (bias_rows != nullptr) {
    p.bias = bias_rows->data_ptr<float>();
    p.max_distance = static_cast<int>((bias_rows->size(1) - 1) / 2);
  }

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

Tensor cuda_paged_attn(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                       const Tensor& cache_seqlens, double scale) {
  return paged_attn_impl(q, k_cache, v_cache, block_table, cache_seqlens, scale, nullptr);
}

Tensor cuda_paged_attn_rpb(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                           const Tensor& cache_seqlens, const Tensor& table, const Tensor& buckets, double scale) {
  check_bias_args(table, buckets, q);
  TORCH_CHECK(buckets.numel() <= 2 * 65536 + 1, "paged_attn_rpb (CUDA): max_distance must be <= 65536");
  const c10::cuda::CUDAGuard guard(q.device());
  // Per head, the bias of every clamped relative position, in log2 units like the scores.
  const Tensor rows = (table.t().index_select(1, buckets.to(at::kLong)) * kLog2e).contiguous();
  return paged_attn_impl(q, k_cache, v_cache, block_table, cache_seqlens, scale, &rows);
}

void cuda_write_kv_cache(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache,
                         const Tensor& slot_mapping) {
  check_write_kv_args(k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k_cache.is_cuda(), "write_kv_cache_cuda: the caches must be CUDA tensors, got ", k_cache.device());
  const int64_t n_tokens = k.size(0), n_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  if (n_tokens == 0 || n_kv_heads * head_dim == 0) return;
  TORCH_CHECK(n_kv_heads * head_dim <= std::numeric_limits<int>::max() / 2, "write_kv_cache (CUDA): rows of ",
              n_kv_heads * head_dim, " elements are too long");
  const c10::cuda::CUDAGuard guard(k_cache.device());

  const WriteParams p = write_kv_params(k, v, k_cache, v_cache, slot_mapping);

  // 8-wide packs need head_dim, the k/v strides and every base address to keep them 16-byte aligned
  // (an fp32 side moves 32 bytes per pack: two aligned 16-byte accesses).
  const bool packed = head_dim % 8 == 0 && p.k_stride_t % 8 == 0 && p.k_stride_h % 8 == 0 &&
                      p.v_stride_t % 8 == 0 && p.v_stride_h % 8 == 0 && cuda::is_aligned(p.k, 16) &&
                      cuda::is_aligned(p.v, 16) && cuda::is_aligned(p.k_cache, 16) &&
                      cuda::is_aligned(p.v_cache, 16);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(n_tokens, kWarps)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(k.scalar_type(), "write_kv_cache (CUDA)", [&](auto in_tag) {
    using Tin = decltype(in_tag);
    dispatch_float(k_cache.scalar_type(), "write_kv_cache (CUDA)", [&](auto out_tag) {
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

}  // namespace
}  // namespace plm_engine

PLM_REGISTER_KERNELS(CUDA, cuda, paged_attn, paged_attn_rpb, write_kv_cache)
