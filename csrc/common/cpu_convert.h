// Scalar fp32 <-> fp16 / bf16 conversions for the CPU kernels that the compiler can vectorise.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace plm_engine {

// c10's scalar conversions branch (NaN checks, denormal paths), which stops the compiler vectorising a
// loop that converts. These are branch-free bit manipulations with the same results: round to nearest
// even, NaN stays NaN, overflow to inf, fp16 denormals handled. Used by the CPU kernels' portable
// (compiler-vectorised) loops; the vector policies (cpu/simd.h) use intrinsics instead.
namespace cpu {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Bit-level conversions on the raw uint16_t storage of bf16 / fp16.
inline float bf16_bits_to_f32(uint16_t b) { return bits_to_f32(static_cast<uint32_t>(b) << 16); }

inline float fp16_bits_to_f32(uint16_t b) {
  const uint32_t h = b, em = h & 0x7fffu;
  // Exponent and mantissa moved into fp32 position keep fp16's bias; 2^112 rebiases them (normals and
  // denormals alike). Inf / NaN only need the fp32 all-ones exponent.
  const float finite = bits_to_f32(em << 13) * 0x1p112f;
  const uint32_t mag = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : f32_to_bits(finite);
  return bits_to_f32(mag | ((h & 0x8000u) << 16));
}

inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

inline uint16_t f32_to_fp16_bits(float f) {
  const uint32_t u = f32_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  // Normal results: rebias the exponent and round the 13 dropped bits to nearest even.
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // Results below 2^-14 (fp16 denormals): adding 0.5 lets the fp32 adder do the rounding.
  const uint32_t denormal = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3f000000u;
  const uint32_t special = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN, or inf / overflow
  const uint32_t mag = a >= 0x47800000u ? special : (a < 0x38800000u ? denormal : normal);
  return static_cast<uint16_t>(mag | sign);
}

inline float load_f32(float v) { return v; }
inline float load_f32(c10::BFloat16 v) { return bf16_bits_to_f32(v.x); }
inline float load_f32(c10::Half v) { return fp16_bits_to_f32(v.x); }

template <typename T>
inline T store_as(float f);

template <>
inline float store_as<float>(float f) {
  return f;
}

template <>
inline c10::BFloat16 store_as<c10::BFloat16>(float f) {
  return c10::BFloat16(f32_to_bf16_bits(f), c10::BFloat16::from_bits());
}

template <>
inline c10::Half store_as<c10::Half>(float f) {
  return c10::Half(f32_to_fp16_bits(f), c10::Half::from_bits());
}

// The same conversions on raw storage (float, or the uint16_t bits of fp16 / bf16). GCC vectorises
// loops over uint16_t arrays more reliably than loops over the c10 structs, so hot loops use these.
// Raw<T> names T's storage and its two conversions, so each type's pair is written once.
template <typename T>
struct Raw {
  using type = float;
  static float load(float v) { return v; }
  static float store(float f) { return f; }
};
template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;
  static float load(uint16_t v) { return bf16_bits_to_f32(v); }
  static uint16_t store(float f) { return f32_to_bf16_bits(f); }
};
template <>
struct Raw<c10::Half> {
  using type = uint16_t;
  static float load(uint16_t v) { return fp16_bits_to_f32(v); }
  static uint16_t store(float f) { return f32_to_fp16_bits(f); }
};

template <typename T>
inline float load_raw(typename Raw<T>::type v) {
  return Raw<T>::load(v);
}

template <typename T>
inline typename Raw<T>::type store_raw(float f) {
  return Raw<T>::store(f);
}

}  // namespace cpu

}  // namespace plm_engine
