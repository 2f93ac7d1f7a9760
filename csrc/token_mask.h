// Token bitmask (structured output): the contract, and the argument checks of its entry point
// (token_mask_ops.cpp). Kernel: cpu/token_mask.cpp (CPU); on GPUs the Triton kernel runs.
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

// Shapes, dtypes, devices and strides: what the kernel indexes (plm_engine.ops.token_mask checks the
// rest). The CPU kernel also range-checks the rows, which it reads anyway.
void check_token_bitmask_args(const Tensor& logits, const Tensor& bitmask, const std::optional<Tensor>& rows);

}  // namespace plm_engine
