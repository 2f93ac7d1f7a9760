// LayerNorm / RMSNorm on the CPU, with the optional fused residual add.
//
// OpenMP over rows (at::parallel_for); each thread reads a row from memory once, keeps it in L1/L2 for
// the centred two-pass variance and the output, and writes each output once. Statistics in fp32.
//
// The row kernels (cpu/norms_kernels.inc) are written once against the vector policy of cpu/simd.h and
// compiled once per instruction set (generic, avx2, avx512: simd_instantiate.inc); each row range runs
// the build cpu::cpu_isa() names (PLM_CPU_CALL). PLM_ENGINE_CPU_ISA or set_cpu_isa() caps the choice.
//
// Determinism: a row is reduced by one thread in a fixed order, and the backward's dweight / dbias are
// accumulated per fixed chunk of rows and summed in chunk order, so results do not depend on the thread
// count.
//
// Memory-bound tricks, each kept because benchmarks/bench_norms.py showed it paying off (figures and
// machine in benchmarks/results/NOTES.md):
//  - transparent huge pages for fresh large outputs (empty_output): first-touch page faults on a fresh
//    64 MiB buffer cost several times the kernel itself;
//  - non-temporal (streaming) stores for outputs far larger than the caches (kStreamMinBytes): a normal
//    store first reads the line it overwrites (read-for-ownership). On reused memory this made the
//    forward faster; on freshly faulted huge pages it is neutral; on outputs that could stay in
//    L3, and on fresh 4 KiB pages (no huge pages), it is slower, so neither streams;
//  - software prefetch of the next row was slower than the hardware prefetchers: not used.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_memory.h"
#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "norms.h"

namespace plm_engine {
namespace {

// ---- arguments shared by every build of the row kernels ------------------------------------------

template <typename T, typename Wt>
struct NormFwdArgs {
  const T* x;
  const T* res;  // nullptr: no residual
  const Wt* w;
  const Wt* b;  // nullptr: no bias
  T* y;
  T* h;         // x + res, written only with a residual
  float* mean;  // unused for RMSNorm
  float* rstd;
  int64_t n;
  float eps;
  bool is_rms;
  bool stream;  // use non-temporal stores for y and h
};

template <typename T, typename Wt>
struct NormBwdArgs {
  const T* dy;
  const T* dh;  // nullptr: no gradient into h
  const T* h;
  const Wt* w;
  const float* mean;  // unused for RMSNorm
  const float* rstd;
  T* dx;
  int64_t n;
  bool is_rms;
  bool stream;  // use non-temporal stores for dx
};

// ---- the row kernels, one build per instruction set --------------------------------------------

#define PLM_SIMD_KERNELS "cpu/norms_kernels.inc"
#include "cpu/simd_instantiate.inc"

// ---- memory ---------------------------------------------------------------------------------------

// Outputs at least this large (in total) are written with non-temporal stores. Twice a typical last-level
// cache (32 MiB per CCX / socket slice): such outputs cannot stay cached for the next op anyway, so
// skipping the read-for-ownership is free bandwidth. Smaller outputs are stored normally: they partly
// stay in L3, where the next op (and the allocator's next reuse of the same memory) finds them;
// streaming them was slower (benchmarks/results/NOTES.md).
// (sysconf's L3 size is no guide: in a VM it can report the whole host socket.)
constexpr int64_t kStreamMinBytes = int64_t{64} << 20;

// Elements a thread should get at least (ATen's GRAIN_SIZE): smaller problems run on one thread,
// where waking the OpenMP team would cost more than it saves.
constexpr int64_t kGrainElems = 32768;

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, (kGrainElems + elems_per_item - 1) / std::max<int64_t>(1, elems_per_item));
}

// At most this many dweight/dbias partial rows in the backward: enough chunks to balance the threads of
// a large machine, few enough that zeroing and summing the partials stays small next to the rows.
constexpr int64_t kMaxChunks = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (n_chunks, n) fp32 partials -> (n,) sums, each column summed over the chunks in order 0, 1, ...
Tensor sum_chunks(const Tensor& partial) {
  const int64_t n_chunks = partial.size(0), n = partial.size(1);
  Tensor out = at::empty({n}, partial.options());
  const float* p = partial.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, n, grain_for(n_chunks), [&](int64_t begin, int64_t end) {
    PLM_CPU_CALL(sum_partials, p, n_chunks, n, o, begin, end);
  });
  return out;
}

using cpu::empty_output;
using cpu::huge_pages_enabled;

// Non-temporal stores for this many output bytes? Only for outputs past kStreamMinBytes, and only when
// they get huge pages: a fresh 4 KiB page is zeroed by the kernel at first touch and is still in cache,
// so streaming over it writes each line twice (slower than without streaming: benchmarks/results/NOTES.md).
// Zeroing a 2 MiB page leaves little of it in L2, and streaming is then
// neutral to faster.
bool use_streaming_stores(int64_t out_bytes) {
  return out_bytes >= kStreamMinBytes && huge_pages_enabled();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                        const std::optional<Tensor>& bias,
                                                        const std::optional<Tensor>& residual, double eps,
                                                        bool is_rms) {
  check_norm_fwd_args(x, weight, bias, residual);
  const int64_t rows = x.size(0), n = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor y = empty_output(x);
  Tensor h = residual.has_value() ? empty_output(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({is_rms ? 0 : rows}, f32);
  Tensor rstd = at::empty({rows}, f32);
  if (rows == 0 || n == 0) {
    if (n == 0) rstd.fill_(1.f / std::sqrt(static_cast<float>(eps))), mean.zero_();
    return {y, h, mean, rstd};
  }
  const int64_t out_bytes = y.nbytes() + h.nbytes();
  PLM_DISPATCH_NORM_TYPES(x.scalar_type(), weight.scalar_type(), "norm_fwd_cpu", [&] {
    NormFwdArgs<T, W> a{x.const_data_ptr<T>(),
                        residual ? residual->const_data_ptr<T>() : nullptr,
                        weight.const_data_ptr<W>(),
                        bias ? bias->const_data_ptr<W>() : nullptr,
                        y.mutable_data_ptr<T>(),
                        residual ? h.mutable_data_ptr<T>() : nullptr,
                        is_rms ? nullptr : mean.mutable_data_ptr<float>(),
                        rstd.mutable_data_ptr<float>(),
                        n,
                        static_cast<float>(eps),
                        is_rms,
                        use_streaming_stores(out_bytes)};
    at::parallel_for(0, rows, grain_for(n),
                     [&](int64_t begin, int64_t end) { PLM_CPU_CALL(norm_fwd_rows, a, begin, end); });
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy, const std::optional<Tensor>& dh,
                                                const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                const Tensor& rstd, bool has_bias, bool is_rms) {
  check_norm_bwd_args(dy, dh, h, weight, mean, rstd, is_rms);
  const int64_t rows = h.size(0), n = h.size(1);
  Tensor dx = empty_output(h);
  // Rows are split into fixed chunks; chunk c accumulates its dweight/dbias into row c of the partial
  // buffers, which are then summed in chunk order. The chunking depends on the shape only (never on
  // the thread count), so the result is the same bits whatever the number of threads.
  const int64_t per_chunk = std::max(ceil_div(rows, kMaxChunks), ceil_div(kGrainElems, std::max<int64_t>(1, n)));
  const int64_t n_chunks = std::max<int64_t>(1, ceil_div(rows, per_chunk));
  auto f32 = h.options().dtype(at::kFloat);
  Tensor dw_partial = at::zeros({n_chunks, n}, f32);
  Tensor db_partial = has_bias ? at::zeros({n_chunks, n}, f32) : Tensor();
  if (rows > 0 && n > 0) {
    PLM_DISPATCH_NORM_TYPES(h.scalar_type(), weight.scalar_type(), "norm_bwd_cpu", [&] {
      NormBwdArgs<T, W> a{dy.const_data_ptr<T>(),
                          dh ? dh->const_data_ptr<T>() : nullptr,
                          h.const_data_ptr<T>(),
                          weight.const_data_ptr<W>(),
                          is_rms ? nullptr : mean.const_data_ptr<float>(),
                          rstd.const_data_ptr<float>(),
                          dx.mutable_data_ptr<T>(),
                          n,
                          is_rms,
                          use_streaming_stores(dx.nbytes())};
      float* dwp = dw_partial.mutable_data_ptr<float>();
      float* dbp = has_bias ? db_partial.mutable_data_ptr<float>() : nullptr;
      at::parallel_for(0, n_chunks, 1, [&](int64_t cbegin, int64_t cend) {
        for (int64_t c = cbegin; c < cend; ++c)
          PLM_CPU_CALL(norm_bwd_rows, a, c * per_chunk, std::min(rows, (c + 1) * per_chunk), dwp + c * n,
                       dbp ? dbp + c * n : nullptr);
      });
    });
  }
  Tensor dw = sum_chunks(dw_partial).to(weight.scalar_type());
  Tensor db = has_bias ? sum_chunks(db_partial).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {dx, dw, db};
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("norm_fwd", &plm_engine::norm_fwd_cpu);
  m.impl("norm_bwd", &plm_engine::norm_bwd_cpu);
}
