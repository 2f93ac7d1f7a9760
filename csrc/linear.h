// y = x @ weight^T + bias for few rows of x (the decode case): the contract, and the argument checks of
// its entry point (linear_ops.cpp). There is no CUDA kernel: on GPUs plm_engine.ops.linear calls F.linear
// (cuBLAS). Kernel: cpu/linear.cpp (CPU).
//   linear_fwd(x, weight, bias) -> y   x (M, K), weight (N, K), bias (N,) or None; y (M, N) = x @ W^T + b
//                                      in x's dtype (fp32, fp16 or bf16, all inputs alike), fp32 math
//   linear_q_fwd(x, qweight, qtype, bias) -> y
//                                      the same with a GGUF-quantized weight: qweight (N, row_bytes) uint8,
//                                      each row K / block values in ggml's blocks of type qtype (the ggml
//                                      type id: Q4_0 2, Q4_1 3, Q8_0 8, Q4_K 12, Q6_K 14); y (M, N) in x's
//                                      dtype equals linear_fwd(x, dequantized weight, bias) on the exact
//                                      path; up to a few rows of Q8_0/Q4_0/Q4_1, x is quantized per block
//                                      to int8 instead (cpu/linear.cpp, cpu/linear_q8.inc) (CPU only)
//   linear_cpu_isa() -> str            the instruction set the CPU kernel runs with now (cpu::cpu_isa(),
//                                      followed at run time): "avx512_bf16" | "avx512" | "avx2" |
//                                      "generic" ("neon" on aarch64)
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>

namespace plm_engine {

using at::Tensor;

// Shapes, dtypes and devices: what the kernel indexes (plm_engine.ops.linear checks the rest).
void check_linear_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias);
void check_linear_q_args(const Tensor& x, const Tensor& qweight, int64_t qtype, const std::optional<Tensor>& bias);
// cpu/linear.cpp
std::string linear_cpu_isa();

// The GGUF block types linear_q_fwd reads (ggml's type ids) and their blocks: values, bytes.
enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };
struct QBlock {
  int64_t values, bytes;  // {0, 0}: not a type linear_q_fwd reads
};
inline QBlock q_block(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ6_K: return {256, 210};
    default: return {0, 0};
  }
}

}  // namespace plm_engine
