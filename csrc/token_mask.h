// Token bitmask (structured output): declarations shared by token_mask_ops.cpp (schema, checks, CPU
// registration) and cpu/token_mask.cpp.
//
//   apply_token_bitmask_(logits!, bitmask, rows?)
// logits (n, vocab) fp32/fp16/bf16 with a unit last stride (any row stride), changed in place;
// bitmask (m, ceil(vocab / 32)) int32 with a unit last stride: token j of mask row i is allowed iff bit
// j % 32 (least significant first) of word j / 32 is set, the layout llguidance and xgrammar fill;
// rows (m,) int32/int64: the logits row of each mask row (absent: m == n, row i -> i). Disallowed logits
// become -inf; rows not listed, and allowed tokens, are left untouched. A row listed twice gets the
// intersection of its masks.
#pragma once
#include <torch/types.h>

#include <optional>

namespace plm_engine {

using at::Tensor;

// Shape, dtype and device checks of every backend's arguments; the CPU kernel also range-checks rows.
void check_token_bitmask_args(const Tensor& logits, const Tensor& bitmask, const std::optional<Tensor>& rows);

void apply_token_bitmask_cpu(Tensor logits, const Tensor& bitmask, const std::optional<Tensor>& rows);

}  // namespace plm_engine
