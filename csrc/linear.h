// y = x @ weight^T + bias for few rows of x (the decode case): the contract, and the argument checks of
// its entry point (linear_ops.cpp). There is no CUDA kernel: on GPUs plm_engine.ops.linear calls F.linear
// (cuBLAS). Kernel: cpu/linear.cpp (CPU).
//   linear_fwd(x, weight, bias) -> y   x (M, K), weight (N, K), bias (N,) or None; y (M, N) = x @ W^T + b
//                                      in x's dtype (fp32, fp16 or bf16, all inputs alike), fp32 math
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
// cpu/linear.cpp
std::string linear_cpu_isa();

}  // namespace plm_engine
