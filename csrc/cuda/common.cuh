// What every CUDA kernel header starts from: packed (16-byte) loads/stores, fp32 conversions, warp
// reductions and integer helpers for launch shapes.
//
// The kernels of cuda/<family>.cu live in cuda/<family>_kernels.cuh, a header of their own, so that the
// tests can also compile them as host code under csrc/testing/cuda_emu.h and check them on a machine
// without a GPU (tests/ops/test_cuda_emulated.py). So no ATen or CUDA runtime in here or in them; each
// defines its kernels in an unnamed namespace of plm_engine, which sees the names at the end unqualified.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace plm_engine {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// N consecutive elements moved as one aggregate. The alignment is capped at 16 bytes, the widest
// global access (LDG.128/STG.128): a 32-byte pack (8 fp32 weights next to 8 half activations) becomes
// two 16-byte accesses and only needs 16-byte-aligned addresses.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T val[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// torch compiles with __CUDA_NO_HALF_CONVERSIONS__; c10::Half / c10::BFloat16 convert through
// __half2float / __float2half_rn (and the bf16 equivalents) on the device, rounding to nearest even,
// which is also what the CPU kernels and PyTorch do.
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// Butterfly sum: every lane ends with the same bits because fp32 addition is commutative, so lane a
// computing x_a + x_b and lane b computing x_b + x_a agree at every step.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

template <typename I>
constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

}  // namespace cuda
}  // namespace plm_engine

namespace plm_engine {
namespace {
using cuda::ceil_div;
using cuda::from_float;
using cuda::kFullMask;
using cuda::kNegInf;
using cuda::kWarpSize;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::to_float;
using cuda::warp_sum;
}  // namespace
}  // namespace plm_engine
