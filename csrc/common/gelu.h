// The GELU constants, one definition for the CPU and CUDA kernels (plain constexpr floats, so kernel
// headers compiled by nvcc and by the CPU emulator of csrc/testing can include this too).
#pragma once

namespace plm_engine {

constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi): the normal density at 0
constexpr float kTanhK0 = 0.79788456080286536f;      // sqrt(2 / pi)
constexpr float kTanhK1 = 0.044715f;                 // the cubic term of gelu_tanh's argument

}  // namespace plm_engine
