// The vector policies every CPU kernel is written against: one source, one build per instruction set.
//
// A kernel's SIMD code lives in an .inc file written against `Vec` (one of the policies below) and the
// helpers of simd_math.inc; simd_instantiate.inc includes it once per instruction set, each time inside
// a `#pragma GCC target` region and a namespace (generic / avx2 / avx512) where `Vec` names that
// policy. The policies themselves are defined inside the same target regions, so their intrinsics
// inline into the kernels. Only our own code may sit in a target region: every header is included
// before (here or by the kernel .cpp), so no library code is compiled for AVX2/AVX-512 and leaks into
// the generic build (tests/ops/test_cpu_isa.py checks the binary for that).
//
// A policy `Vec` has, for vectors of Vec::W fp32 lanes (V) and lane masks (M):
//   kName                                        "generic" / "neon" / "avx2" / "avx512"
//   zero(), set1(a)
//   add, sub, mul, div, min, max                 (max/min: IEEE maxps semantics, no NaN promise)
//   fmadd(a, b, c) = a*b + c, fnmadd(a, b, c) = c - a*b, fmsub(a, b, c) = a*b - c   (fused where the ISA has FMA)
//   neg, abs, sqrt, round (to nearest even)
//   swap_pairs(v)                                lanes (0 1)(2 3)... exchanged: (v1, v0, v3, v2, ...)
//   lt, le, gt, ge, eq, isnan -> M; first(n): lanes [0, n); select(m, a, b) = m ? a : b; mand, mor, any(m)
//   sum(v), hmax(v)                              horizontal reductions (a fixed order per ISA)
//   scale2(p, k) = p * 2^k for integral k in [-126, 127] (normal results)
//   load(p), load(p, n)                          p: const float / c10::BFloat16 / c10::Half, widened
//                                                to fp32; with n: lanes [0, n) read, the rest are 0,
//                                                and no memory past p[n - 1] is touched
//   store(p, v), store(p, v, n)                  to float / BFloat16 / Half, rounded to nearest even
//                                                like c10 (bf16: NaN -> quiet NaN); with n: lanes [0, n)
//   stream(p, v), fence()                        non-temporal store (p aligned to W * sizeof(*p)),
//                                                and the fence other threads need before reading it
//   round_to<T>(v)                               v rounded to T and widened back, in registers
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/cpu_convert.h"
#include "cpu/isa.h"

#ifdef PLM_SIMD_X86
#include <immintrin.h>
#endif
#ifdef PLM_SIMD_NEON
#include <arm_neon.h>
#endif

namespace plm_engine {
namespace cpu {
namespace simd {

// Scalar conversions shared by every policy's tails: common/cpu_convert.h's (branch-free, same rounding
// as c10).
template <typename T>
inline float to_f(T v) {
  return load_f32(v);
}

template <typename T>
inline T from_f(float f) {
  return store_as<T>(f);
}

// ---- generic: W plain floats, loops the compiler vectorises for the baseline ISA (SSE2 on x86-64) ----

struct Generic {
  static constexpr int W = 8;
  static constexpr const char* kName = "generic";
  struct V {
    float x[W];
  };
  struct M {
    bool x[W];
  };

#define PLM_GEN_MAP(expr) \
  V r;                    \
  for (int i = 0; i < W; ++i) r.x[i] = (expr); \
  return r
#define PLM_GEN_CMP(expr) \
  M r;                    \
  for (int i = 0; i < W; ++i) r.x[i] = (expr); \
  return r

  static V zero() { return set1(0.f); }
  static V set1(float a) { PLM_GEN_MAP(a); }
  static V add(V a, V b) { PLM_GEN_MAP(a.x[i] + b.x[i]); }
  static V sub(V a, V b) { PLM_GEN_MAP(a.x[i] - b.x[i]); }
  static V mul(V a, V b) { PLM_GEN_MAP(a.x[i] * b.x[i]); }
  static V div(V a, V b) { PLM_GEN_MAP(a.x[i] / b.x[i]); }
  static V min(V a, V b) { PLM_GEN_MAP(a.x[i] < b.x[i] ? a.x[i] : b.x[i]); }
  static V max(V a, V b) { PLM_GEN_MAP(a.x[i] > b.x[i] ? a.x[i] : b.x[i]); }
  static V fmadd(V a, V b, V c) { PLM_GEN_MAP(std::fma(a.x[i], b.x[i], c.x[i])); }
  static V fnmadd(V a, V b, V c) { PLM_GEN_MAP(std::fma(-a.x[i], b.x[i], c.x[i])); }
  static V fmsub(V a, V b, V c) { PLM_GEN_MAP(std::fma(a.x[i], b.x[i], -c.x[i])); }
  static V neg(V a) { PLM_GEN_MAP(-a.x[i]); }
  static V abs(V a) { PLM_GEN_MAP(std::fabs(a.x[i])); }
  static V sqrt(V a) { PLM_GEN_MAP(std::sqrt(a.x[i])); }
  static V round(V a) { PLM_GEN_MAP(std::nearbyint(a.x[i])); }
  static V swap_pairs(V a) { PLM_GEN_MAP(a.x[i ^ 1]); }
  static M lt(V a, V b) { PLM_GEN_CMP(a.x[i] < b.x[i]); }
  static M le(V a, V b) { PLM_GEN_CMP(a.x[i] <= b.x[i]); }
  static M gt(V a, V b) { PLM_GEN_CMP(a.x[i] > b.x[i]); }
  static M ge(V a, V b) { PLM_GEN_CMP(a.x[i] >= b.x[i]); }
  static M eq(V a, V b) { PLM_GEN_CMP(a.x[i] == b.x[i]); }
  static M isnan(V a) { PLM_GEN_CMP(a.x[i] != a.x[i]); }
  static M first(int64_t n) { PLM_GEN_CMP(i < n); }
  static M mand(M a, M b) { PLM_GEN_CMP(a.x[i] && b.x[i]); }
  static M mor(M a, M b) { PLM_GEN_CMP(a.x[i] || b.x[i]); }
  static bool any(M m) {
    bool r = false;
    for (int i = 0; i < W; ++i) r = r || m.x[i];
    return r;
  }
  static V select(M m, V a, V b) { PLM_GEN_MAP(m.x[i] ? a.x[i] : b.x[i]); }
  static V scale2(V p, V k) { PLM_GEN_MAP(std::ldexp(p.x[i], static_cast<int>(k.x[i]))); }
  // Pairwise tree, the same shape as the vector ISAs' reductions.
  static float sum(V a) {
    for (int w = W / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) a.x[i] += a.x[i + w];
    return a.x[0];
  }
  static float hmax(V a) {
    float m = a.x[0];
    for (int i = 1; i < W; ++i) m = a.x[i] > m ? a.x[i] : m;
    return m;
  }
  template <typename T>
  static V load(const T* p) { PLM_GEN_MAP(to_f(p[i])); }
  template <typename T>
  static V load(const T* p, int64_t n) { PLM_GEN_MAP(i < n ? to_f(p[i]) : 0.f); }
  template <typename T>
  static void store(T* p, V v) {
    for (int i = 0; i < W; ++i) p[i] = from_f<T>(v.x[i]);
  }
  template <typename T>
  static void store(T* p, V v, int64_t n) {
    for (int i = 0; i < W && i < n; ++i) p[i] = from_f<T>(v.x[i]);
  }
  template <typename T>
  static void stream(T* p, V v) { store(p, v); }
  static void fence() {}
  template <typename T>
  static V round_to(V v) { PLM_GEN_MAP(to_f(from_f<T>(v.x[i]))); }
#undef PLM_GEN_MAP
#undef PLM_GEN_CMP
};

// ---- NEON (aarch64): 4 fp32 lanes ------------------------------------------------------------------

#ifdef PLM_SIMD_NEON
struct Neon {
  static constexpr int W = 4;
  static constexpr const char* kName = "neon";
  using V = float32x4_t;
  using M = uint32x4_t;
  static V zero() { return vdupq_n_f32(0.f); }
  static V set1(float a) { return vdupq_n_f32(a); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V sub(V a, V b) { return vsubq_f32(a, b); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V div(V a, V b) { return vdivq_f32(a, b); }
  static V min(V a, V b) { return vminq_f32(a, b); }
  static V max(V a, V b) { return vmaxq_f32(a, b); }
  static V fmadd(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V fnmadd(V a, V b, V c) { return vfmsq_f32(c, a, b); }
  static V fmsub(V a, V b, V c) { return vnegq_f32(vfmsq_f32(c, a, b)); }
  static V neg(V a) { return vnegq_f32(a); }
  static V abs(V a) { return vabsq_f32(a); }
  static V sqrt(V a) { return vsqrtq_f32(a); }
  static V swap_pairs(V a) { return vrev64q_f32(a); }
  static V round(V a) { return vrndnq_f32(a); }
  static M lt(V a, V b) { return vcltq_f32(a, b); }
  static M le(V a, V b) { return vcleq_f32(a, b); }
  static M gt(V a, V b) { return vcgtq_f32(a, b); }
  static M ge(V a, V b) { return vcgeq_f32(a, b); }
  static M eq(V a, V b) { return vceqq_f32(a, b); }
  static M isnan(V a) { return vmvnq_u32(vceqq_f32(a, a)); }
  static M first(int64_t n) {
    const uint32_t idx[4] = {0, 1, 2, 3};
    return vcltq_u32(vld1q_u32(idx), vdupq_n_u32(static_cast<uint32_t>(std::min<int64_t>(n, W))));
  }
  static M mand(M a, M b) { return vandq_u32(a, b); }
  static M mor(M a, M b) { return vorrq_u32(a, b); }
  static bool any(M m) { return vmaxvq_u32(m) != 0; }
  static V select(M m, V a, V b) { return vbslq_f32(m, a, b); }
  static V scale2(V p, V k) {
    const int32x4_t e = vshlq_n_s32(vcvtnq_s32_f32(k), 23);
    return vreinterpretq_f32_s32(vaddq_s32(vreinterpretq_s32_f32(p), e));
  }
  static float sum(V a) { return vaddvq_f32(a); }
  static float hmax(V a) { return vmaxvq_f32(a); }
  static V from_bf16(uint16x4_t b) { return vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(b), 16)); }
  static uint16x4_t to_bf16(V v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
    r = vbslq_u32(isnan(v), vorrq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x40)), r);
    return vmovn_u32(r);
  }
  static V load(const float* p) { return vld1q_f32(p); }
  static V load(const c10::BFloat16* p) { return from_bf16(vld1_u16(reinterpret_cast<const uint16_t*>(p))); }
  static V load(const c10::Half* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)))); }
  template <typename T>
  static V load(const T* p, int64_t n) {
    T buf[W] = {};
    std::memcpy(buf, p, sizeof(T) * std::min<int64_t>(n, W));
    return load(static_cast<const T*>(buf));
  }
  static void store(float* p, V v) { vst1q_f32(p, v); }
  static void store(c10::BFloat16* p, V v) { vst1_u16(reinterpret_cast<uint16_t*>(p), to_bf16(v)); }
  static void store(c10::Half* p, V v) { vst1_u16(reinterpret_cast<uint16_t*>(p), vreinterpret_u16_f16(vcvt_f16_f32(v))); }
  template <typename T>
  static void store(T* p, V v, int64_t n) {
    T buf[W];
    store(static_cast<T*>(buf), v);
    std::memcpy(p, buf, sizeof(T) * std::min<int64_t>(n, W));
  }
  template <typename T>
  static void stream(T* p, V v) { store(p, v); }
  static void fence() {}
  template <typename T>
  static V round_to(V v) {
    if constexpr (std::is_same_v<T, float>) return v;
    T buf[W];
    store(static_cast<T*>(buf), v);
    return load(static_cast<const T*>(buf));
  }
};
#endif  // PLM_SIMD_NEON

}  // namespace simd
}  // namespace cpu
}  // namespace plm_engine

#ifdef PLM_SIMD_X86
// ---- AVX2: 8 fp32 lanes; bf16 <-> fp32 by bit shifts (bf16 is the top half of an fp32), fp16 by F16C ----

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace plm_engine {
namespace cpu {
namespace simd {

struct Avx2 {
  static constexpr int W = 8;
  static constexpr const char* kName = "avx2";
  using V = __m256;
  using M = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static V neg(V a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.f)); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V swap_pairs(V a) { return _mm256_permute_ps(a, 0xB1); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static M isnan(V a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static M first(int64_t n) { return _mm256_castsi256_ps(tail_mask(n)); }
  static M mand(M a, M b) { return _mm256_and_ps(a, b); }
  static M mor(M a, M b) { return _mm256_or_ps(a, b); }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static V scale2(V p, V k) {
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(k), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  }
  static float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static V from_bf16(__m128i bits) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)); }
  // Round to nearest even like c10::BFloat16: add 0x7fff plus the lowest kept bit; NaN stays a quiet NaN.
  static __m128i to_bf16(V v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(isnan(v)));
    // packus works within 128-bit lanes: gather the two halves' results into the low 128 bits.
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
  }
  static V from_half(__m128i bits) { return _mm256_cvtph_ps(bits); }
  static __m128i to_half(V v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m256i tail_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, W))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::BFloat16* p) { return from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load(const c10::Half* p) { return from_half(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load(const float* p, int64_t n) { return _mm256_maskload_ps(p, tail_mask(n)); }
  template <typename T>
  static V load(const T* p, int64_t n) {
    uint16_t buf[W] = {};
    std::memcpy(buf, p, sizeof(T) * std::min<int64_t>(n, W));
    return load(reinterpret_cast<const T*>(buf));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static void store(c10::Half* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  static void store(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, tail_mask(n), v); }
  template <typename T>
  static void store(T* p, V v, int64_t n) {
    uint16_t buf[W];
    store(reinterpret_cast<T*>(buf), v);
    std::memcpy(p, buf, sizeof(T) * std::min<int64_t>(n, W));
  }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static void stream(c10::BFloat16* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static void stream(c10::Half* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  static void fence() { _mm_sfence(); }
  template <typename T>
  static V round_to(V v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) return from_bf16(to_bf16(v));
    else if constexpr (std::is_same_v<T, c10::Half>) return from_half(to_half(v));
    else return v;
  }
};

}  // namespace simd
}  // namespace cpu
}  // namespace plm_engine
#pragma GCC pop_options

// ---- AVX-512: 16 fp32 lanes, lane masks; 16-bit types travel as 256-bit halves ---------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 flags the intrinsics' deliberately undefined vectors (_mm512_undefined_*) as maybe
// uninitialised once inlined (GCC bug 105593, fixed in GCC 13): a false positive. simd_instantiate.inc
// repeats this around the kernels, where the helpers are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace plm_engine {
namespace cpu {
namespace simd {

struct Avx512 {
  static constexpr int W = 16;
  static constexpr const char* kName = "avx512";
  using V = __m512;
  using M = __mmask16;
  static M first(int64_t n) { return n >= W ? static_cast<M>(0xffff) : static_cast<M>((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static V neg(V a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN))); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V swap_pairs(V a) { return _mm512_permute_ps(a, 0xB1); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M le(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static M isnan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M mand(M a, M b) { return static_cast<M>(a & b); }
  static M mor(M a, M b) { return static_cast<M>(a | b); }
  static bool any(M m) { return m != 0; }
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static V scale2(V p, V k) { return _mm512_scalef_ps(p, k); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  static float hmax(V a) { return _mm512_reduce_max_ps(a); }

  static V from_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
  // Round to nearest even like c10::BFloat16 (add 0x7fff plus the lowest kept bit); NaN stays a quiet
  // NaN. Not VCVTNEPS2BF16 (AVX512_BF16): it flushes denormals, which c10 and PyTorch eager keep.
  static __m256i to_bf16(V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    r = _mm512_mask_mov_epi32(r, isnan(v), qnan);
    return _mm512_cvtepi32_epi16(r);
  }
  static V from_half(__m256i b) { return _mm512_cvtph_ps(b); }
  static __m256i to_half(V v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::BFloat16* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load(const c10::Half* p) { return from_half(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // Masked loads and stores never touch (or fault on) the masked-off memory.
  static V load(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static V load(const c10::BFloat16* p, int64_t n) { return from_bf16(_mm256_maskz_loadu_epi16(first(n), p)); }
  static V load(const c10::Half* p, int64_t n) { return from_half(_mm256_maskz_loadu_epi16(first(n), p)); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void store(c10::Half* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
  static void store(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static void store(c10::BFloat16* p, V v, int64_t n) { _mm256_mask_storeu_epi16(p, first(n), to_bf16(v)); }
  static void store(c10::Half* p, V v, int64_t n) { _mm256_mask_storeu_epi16(p, first(n), to_half(v)); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static void stream(c10::BFloat16* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void stream(c10::Half* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
  static void fence() { _mm_sfence(); }
  template <typename T>
  static V round_to(V v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) return from_bf16(to_bf16(v));
    else if constexpr (std::is_same_v<T, c10::Half>) return from_half(to_half(v));
    else return v;
  }
};

}  // namespace simd
}  // namespace cpu
}  // namespace plm_engine
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_SIMD_X86
