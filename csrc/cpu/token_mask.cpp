// Token bitmask on the CPU: disallowed logits -> -inf, in place (the contract: token_mask.h).
//
// Rows are spread over threads with at::parallel_for; a decode batch's masks are small (vocab / 8 bytes
// per row), so small calls stay on the calling thread. The row kernel (cpu/token_mask_kernels.inc) is
// compiled for every instruction set; PLM_CPU_CALL picks the build once per task.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "token_mask.h"

namespace plm_engine {
namespace {

#define PLM_SIMD_KERNELS "cpu/token_mask_kernels.inc"
#include "cpu/simd_instantiate.inc"

// Row indices as int64, each checked against the logits' rows (a bad index is an error, never a write
// outside the tensor).
std::vector<int64_t> row_indices(const std::optional<Tensor>& rows, int64_t m, int64_t n) {
  std::vector<int64_t> out(m);
  if (!rows.has_value()) {
    for (int64_t i = 0; i < m; ++i) out[i] = i;
    return out;
  }
  const Tensor r = rows->contiguous();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t v = r.scalar_type() == at::kInt ? r.const_data_ptr<int32_t>()[i] : r.const_data_ptr<int64_t>()[i];
    TORCH_CHECK(v >= 0 && v < n, "rows[", i, "] = ", v, " is out of range for ", n, " logits rows");
    out[i] = v;
  }
  return out;
}

void apply_token_bitmask_cpu(Tensor logits, const Tensor& bitmask, const std::optional<Tensor>& rows) {
  check_token_bitmask_args(logits, bitmask, rows);
  const int64_t n = logits.size(0), vocab = logits.size(1), m = bitmask.size(0);
  if (m == 0 || vocab == 0) return;
  const std::vector<int64_t> idx = row_indices(rows, m, n);
  // Rows listed twice are masked by one task, one mask after the other (the intersection), so no two
  // threads ever write one row.
  std::vector<int64_t> order(m);
  for (int64_t i = 0; i < m; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return idx[a] < idx[b]; });
  std::vector<int64_t> starts;  // groups of equal rows in `order`
  for (int64_t i = 0; i < m; ++i)
    if (i == 0 || idx[order[i]] != idx[order[i - 1]]) starts.push_back(i);
  starts.push_back(m);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  const int64_t sl = logits.stride(0), sm = bitmask.stride(0);
  const int32_t* words = bitmask.const_data_ptr<int32_t>();
  // About 256K logits per task at least (a few rows of a 50k vocabulary): a row that fits in cache is
  // cheaper than waking a thread (benchmarks/results/NOTES.md), while large batches (mostly -inf stores,
  // bound by memory bandwidth) still spread over the cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / vocab);
  PLM_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "apply_token_bitmask_cpu", [&] {
    scalar_t* base = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        for (int64_t k = starts[g]; k < starts[g + 1]; ++k) {
          const int64_t i = order[k];
          PLM_CPU_CALL(mask_row<scalar_t>, base + idx[i] * sl, words + i * sm, vocab);
        }
      }
    });
  });
}

}  // namespace
}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("apply_token_bitmask_", &plm_engine::apply_token_bitmask_cpu);
}
