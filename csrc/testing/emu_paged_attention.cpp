// The kernels of csrc/cuda/paged_attention.cu under the emulator, with launchers that mirror
// paged_attention.cu's (the number of KV splits, which the GPU launcher derives from the SM count, is
// the caller's).
#include "testing/emu_prelude.h"
//
#include "cuda/paged_attention_kernels.cuh"

namespace plm_emu_ops {
namespace {

using namespace plm_engine;
using plm_emu::emu_launch;

template <typename T, int D>
void launch_split_rows(const PagedParams& p, int rows, dim3 grid) {
  const dim3 block(kThreads);
  if (rows == 1) {
    emu_launch(paged_attn_split_kernel<T, D, 1>, grid, block, 0, p);
  } else if (rows == 4) {
    emu_launch(paged_attn_split_kernel<T, D, 4>, grid, block, 0, p);
  } else {
    emu_launch(paged_attn_split_kernel<T, D, 8>, grid, block, 0, p);
  }
}

template <typename T>
void launch_paged(const PagedParams& p, int rows, dim3 grid, int64_t n_out_rows) {
  if (p.head_dim <= 64) {
    launch_split_rows<T, 64>(p, rows, grid);
  } else if (p.head_dim <= 128) {
    launch_split_rows<T, 128>(p, rows, grid);
  } else {
    launch_split_rows<T, 256>(p, rows, grid);
  }
  if (p.num_splits > 1) {
    const dim3 cgrid(static_cast<unsigned>(ceil_div<int64_t>(n_out_rows, kWarps)));
    emu_launch(paged_attn_combine_kernel<T>, cgrid, dim3(kThreads), 0, p.part_out, p.part_lse, static_cast<T*>(p.out),
               n_out_rows, p.num_splits, p.head_dim);
  }
}

}  // namespace

void paged_attn(const PagedCall& c) {
  const int64_t group = c.n_heads / c.n_kv_heads;
  const int64_t n_rows = group * c.seqlen_q;
  const int rows = n_rows == 1 ? 1 : (n_rows <= 4 ? 4 : 8);
  const int64_t row_tiles = ceil_div<int64_t>(n_rows, rows);
  const int num_splits = std::max(1, std::min(c.num_splits, kMaxSplits));
  // NaN poison: the combine kernel must read only what the split kernel wrote.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> part_out, part_lse;
  if (num_splits > 1) {
    part_out.assign(static_cast<size_t>(c.batch * c.seqlen_q * c.n_heads * num_splits * c.head_dim), nan);
    part_lse.assign(static_cast<size_t>(c.batch * c.seqlen_q * c.n_heads * num_splits), nan);
  }
  PagedParams p;
  p.q = c.q;
  p.k_cache = c.k_cache;
  p.v_cache = c.v_cache;
  p.block_table = c.block_table;
  p.cache_seqlens = c.cache_seqlens;
  p.out = c.out;
  p.part_out = num_splits > 1 ? part_out.data() : nullptr;
  p.part_lse = num_splits > 1 ? part_lse.data() : nullptr;
  p.q_stride_b = c.q_stride[0];
  p.q_stride_s = c.q_stride[1];
  p.q_stride_h = c.q_stride[2];
  p.cache_stride_block = c.cache_stride_block;
  p.cache_stride_slot = c.cache_stride_slot;
  p.bt_stride = c.bt_stride;
  p.seqlen_q = static_cast<int>(c.seqlen_q);
  p.n_heads = static_cast<int>(c.n_heads);
  p.group = static_cast<int>(group);
  p.n_rows = static_cast<int>(n_rows);
  p.row_tiles = static_cast<int>(row_tiles);
  p.head_dim = static_cast<int>(c.head_dim);
  p.page_shift = 0;
  while ((int64_t{1} << p.page_shift) < c.block_size) ++p.page_shift;
  p.num_splits = num_splits;
  p.scale_log2 = c.scale * kLog2e;
  p.bias = c.bias;
  p.max_distance = c.max_distance;
  const dim3 grid(static_cast<unsigned>(c.batch), static_cast<unsigned>(c.n_kv_heads * row_tiles),
                  static_cast<unsigned>(num_splits));
  const int64_t n_out_rows = c.batch * c.seqlen_q * c.n_heads;
  if (c.t == Dtype::kF16) {
    launch_paged<at::Half>(p, rows, grid, n_out_rows);
  } else if (c.t == Dtype::kBF16) {
    launch_paged<at::BFloat16>(p, rows, grid, n_out_rows);
  } else {
    throw std::invalid_argument("cuda_emu: paged_attn takes float16/bfloat16");
  }
}

void write_kv_cache(Dtype tin, Dtype tout, const WriteParams& p) {
  if (p.n_tokens == 0 || p.n_kv_heads * p.head_dim == 0) return;
  using cuda::is_aligned;
  const bool packed = p.head_dim % 8 == 0 && p.k_stride_t % 8 == 0 && p.k_stride_h % 8 == 0 &&
                      p.v_stride_t % 8 == 0 && p.v_stride_h % 8 == 0 && is_aligned(p.k, 16) && is_aligned(p.v, 16) &&
                      is_aligned(p.k_cache, 16) && is_aligned(p.v_cache, 16);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.n_tokens, kWarps)));
  dispatch(tin, [&](auto in_tag) {
    using Tin = decltype(in_tag);
    dispatch(tout, [&](auto out_tag) {
      using Tout = decltype(out_tag);
      if constexpr (!std::is_same_v<Tin, double> && !std::is_same_v<Tout, double>) {
        if (packed) {
          emu_launch(write_kv_cache_kernel<Tin, Tout, 8>, grid, dim3(kThreads), 0, p);
        } else {
          emu_launch(write_kv_cache_kernel<Tin, Tout, 1>, grid, dim3(kThreads), 0, p);
        }
      }
    });
  });
}

}  // namespace plm_emu_ops
