// SwiGLU and GELU on the CPU, forward and backward.
//
// The work is cut into chunks of up to CHUNK elements of one row (a contiguous input is one long row)
// and spread over threads with at::parallel_for. Each chunk runs a unit-stride loop of fp32 math.
// glibc's expf/erff do not vectorise without -ffast-math, so exp and the normal CDF are computed here
// by branch-free polynomial code, in two builds chosen at run time (cpu::avx512_enabled()):
//  - AVX-512 intrinsics (cpu/simd512.h for the loads, stores and exp), whole vectors plus one masked
//    tail vector per chunk;
//  - portable loops the compiler vectorises, compiled for AVX-512, AVX2 and the baseline ISA
//    (target_clones): what CPUs without AVX-512 (or PLM_ENGINE_CPU_ISA=generic) run.
// Both evaluate the same formulas with the same coefficients.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "common/cpu_convert.h"
#include "cpu/simd512.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PLM_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PLM_VEC_CLONES
#endif

namespace plm_engine {
namespace {

constexpr int64_t CHUNK = 4096;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK0 = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhK1 = 0.044715f;

// e^(h + l) to ~2 ulp for h in [-87, 88] (clamped outside, which only affects results already 0 or inf
// in the formulas below) and a small correction l (|l| < 0.1). 2^n * e^r with n = round(h / ln2),
// r = h - n ln2 + l in about [-0.45, 0.45] (Cody-Waite split of ln2 so n * ln2_hi is exact), e^r by its
// degree-7 Taylor polynomial. l joins after the reduction, so h + l itself is never rounded: that is
// how exp(-x^2 / 2) below stays accurate at large |x|.
inline float exp_hl_f32(float h, float l) {
  h = h < -87.f ? -87.f : (h > 88.f ? 88.f : h);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
  const float n = (h * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = h - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  r = r + l;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp_f32(float x) { return exp_hl_f32(x, 0.f); }

inline float sigmoid_f32(float x) { return 1.f / (1.f + exp_f32(-x)); }

// ---- exact GELU: the normal CDF Phi without erf ------------------------------------------------------
// Phi(-a) = exp(-a^2 / 2) S(a) for a >= 0, where S(a) = Phi(-a) e^(a^2/2) is smooth (0.5 at 0, ~1/(a
// sqrt(2 pi)) for large a). S is a piecewise polynomial: 16 intervals of width 13.2 / 16 on [0, 13.2],
// each a degree-7 polynomial in (a - centre), fitted for this file: Lawson's iteratively reweighted
// least squares toward the minimax relative error on 4000 Chebyshev nodes per interval, against fp64
// 0.5 erfc(a / sqrt 2) e^(a^2/2), coefficients rounded to fp32. Max relative error of S evaluated in
// fp32 (200k points per interval): 1.1e-7, about 1 ulp; with exp's ~2 ulp, Phi(-a) is accurate relative
// to itself everywhere, so GELU has no cancellation in the x << 0 tail (unlike x (1 + erf(x / sqrt 2)) / 2),
// and there is no division. Beyond a = 13.2, Phi(-a) < 1e-39 (an fp32 denormal) and is taken as 0.
constexpr float kPhiTop = 13.2f;
constexpr float kPhiInvWidth = 16.f / 13.2f;
alignas(64) constexpr float kPhiTailCentre[16] = {
    4.125e-1f, 1.2375f, 2.0625f, 2.8875f, 3.7125f, 4.5375f, 5.3625f, 6.1875f,
    7.0125f, 7.8375f, 8.6625f, 9.4875f, 1.03125e1f, 1.11375e1f, 1.19625e1f, 1.27875e1f,
};
// kPhiTailCoef[j][k]: coefficient of (a - centre)^j on interval k (columns = intervals, so one aligned
// 16-lane load holds a coefficient of every interval for the AVX-512 table lookup).
alignas(64) constexpr float kPhiTailCoef[8][16] = {
    {3.70178e-1f, 2.3214875e-1f, 1.642625e-1f, 1.2550326e-1f, 1.0093919e-1f, 8.41584e-2f,
     7.203953e-2f, 6.290873e-2f, 5.5797547e-2f, 5.0110567e-2f, 4.5463245e-2f, 4.1596867e-2f,
     3.8331356e-2f, 3.5537686e-2f, 3.3121083e-2f, 3.101044e-2f},
    {-2.4624386e-1f, -1.11658216e-1f, -6.0150865e-2f, -3.6551606e-2f, -2.4205526e-2f, -1.7073547e-2f,
     -1.2630292e-2f, -9.694491e-3f, -7.6619913e-3f, -6.2006903e-3f, -5.116903e-3f, -4.2919777e-3f,
     -3.650154e-3f, -3.1413257e-3f, -2.731333e-3f, -2.3962662e-3f},
    {1.3430172e-1f, 4.6985917e-2f, 2.0100683e-2f, 9.980249e-3f, 5.538085e-3f, 3.3435894e-3f,
     2.1547936e-3f, 1.4620373e-3f, 1.0339173e-3f, 7.563286e-4f, 5.690336e-4f, 4.3836425e-4f,
     3.4457198e-4f, 2.7558513e-4f, 2.2375723e-4f, 1.8409226e-4f},
    {-6.3614696e-2f, -1.7837733e-2f, -6.2310756e-3f, -2.5778806e-3f, -1.215129e-3f, -6.3400407e-4f,
     -3.5840357e-4f, -2.160448e-4f, -1.372156e-4f, -9.098842e-5f, -6.254987e-5f, -4.433226e-5f,
     -3.225181e-5f, -2.3998735e-5f, -1.821236e-5f, -1.4062149e-5f},
    {2.7000029e-2f, 6.226084e-3f, 1.8119804e-3f, 6.340971e-4f, 2.5671592e-4f, 1.1669518e-4f,
     5.821242e-5f, 3.1314597e-5f, 1.7923074e-5f, 1.0801637e-5f, 6.7988035e-6f, 4.4404687e-6f,
     2.9937892e-6f, 2.0748048e-6f, 1.472969e-6f, 1.0681296e-6f},
    {-1.0493546e-2f, -2.0259365e-3f, -4.9861404e-4f, -1.4934382e-4f, -5.2402207e-5f, -2.0896006e-5f,
     -9.246459e-6f, -4.456573e-6f, -2.3057587e-6f, -1.2660028e-6f, -7.3099005e-7f, -4.406329e-7f,
     -2.756561e-7f, -1.781125e-7f, -1.183893e-7f, -8.0684956e-8f},
    {3.9218217e-3f, 6.3724566e-4f, 1.3334736e-4f, 3.435279e-5f, 1.04906785e-5f, 3.6822576e-6f,
     1.4493265e-6f, 6.2724274e-7f, 2.9386874e-7f, 1.4720605e-7f, 7.8059685e-8f, 4.3467228e-8f,
     2.5251037e-8f, 1.5220738e-8f, 9.477296e-9f, 6.07322e-9f},
    {-1.3059976e-3f, -1.8341713e-4f, -3.328403e-5f, -7.4847453e-6f, -2.0114649e-6f, -6.267023e-7f,
     -2.2081629e-7f, -8.62357e-8f, -3.672666e-8f, -1.6834601e-8f, -8.217101e-9f, -4.2352784e-9f,
     -2.288734e-9f, -1.2811887e-9f, -7.50775e-10f, -4.5390453e-10f},
};

// Index of a's interval (15 for a beyond the table, and for NaN: the comparison is false).
inline int phi_interval(float a) {
  const float t = a * kPhiInvWidth;
  return static_cast<int>(t < 15.f ? t : 15.f);
}

// exp(-x^2 / 2) with x^2 computed exactly: x splits (Veltkamp, by masking the low 12 mantissa bits) into
// xh + xl with xh * xh exact, and the small rest joins exp after its range reduction. Without the
// split, x^2's rounding (2^-24 x^2 / 2 absolute) would cost up to 40 ulp at |x| = 13.
inline float gauss_f32(float x) {
  const float xh = cpu::bits_to_f32(cpu::f32_to_bits(x) & 0xfffff000u), xl = x - xh;
  return exp_hl_f32(-0.5f * (xh * xh), -0.5f * (xl * (xh + xh + xl)));
}

// Phi(x) given g = gauss_f32(x).
inline float normal_cdf_f32(float x, float g) {
  const float a = x < 0.f ? -x : x;
  const int k = phi_interval(a);
  const float u = a - kPhiTailCentre[k];
  float p = kPhiTailCoef[7][k];
  for (int j = 6; j >= 0; --j) p = p * u + kPhiTailCoef[j][k];
  const float tail = a < kPhiTop ? g * p : 0.f;  // Phi(-|x|)
  return x < 0.f ? tail : 1.f - tail;
}

// gelu_tanh uses 0.5 (1 + tanh(u)) = sigmoid(2u), which needs no tanh and does not cancel for x << 0.
inline float gelu_tanh_cdf_f32(float x) { return sigmoid_f32(2.f * kTanhK0 * (x + kTanhK1 * x * x * x)); }

// Raw views of the c10 element types (see cpu::Raw in activations.h).
template <typename T>
using RawT = typename cpu::Raw<T>::type;

template <typename T>
inline const RawT<T>* raw(const T* p) {
  return reinterpret_cast<const RawT<T>*>(p);
}

template <typename T>
inline RawT<T>* raw(T* p) {
  return reinterpret_cast<RawT<T>*>(p);
}

template <typename T>
PLM_VEC_CLONES void swiglu_fwd_chunk(const T* g_, const T* u_, T* y_, int64_t n) {
  const auto *g = raw(g_), *u = raw(u_);
  auto* y = raw(y_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gv = cpu::load_raw<T>(g[i]);
    y[i] = cpu::store_raw<T>(gv * sigmoid_f32(gv) * cpu::load_raw<T>(u[i]));
  }
}

template <typename T>
PLM_VEC_CLONES void swiglu_bwd_chunk(const T* dy_, const T* g_, const T* u_, T* dg_, T* du_, int64_t n) {
  const auto *dy = raw(dy_), *g = raw(g_), *u = raw(u_);
  auto *dg = raw(dg_), *du = raw(du_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gv = cpu::load_raw<T>(g[i]), uv = cpu::load_raw<T>(u[i]), d = cpu::load_raw<T>(dy[i]);
    const float sig = sigmoid_f32(gv);
    // d silu(g) / dg = sig (1 + g (1 - sig))
    dg[i] = cpu::store_raw<T>(d * uv * sig * (1.f + gv * (1.f - sig)));
    du[i] = cpu::store_raw<T>(d * gv * sig);
  }
}

template <typename T, bool TANH>
PLM_VEC_CLONES void gelu_fwd_chunk(const T* x_, T* y_, int64_t n) {
  const auto* x = raw(x_);
  auto* y = raw(y_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = cpu::load_raw<T>(x[i]);
    y[i] = cpu::store_raw<T>(v * (TANH ? gelu_tanh_cdf_f32(v) : normal_cdf_f32(v, gauss_f32(v))));
  }
}

template <typename T, bool TANH>
PLM_VEC_CLONES void gelu_bwd_chunk(const T* dy_, const T* x_, T* dx_, int64_t n) {
  const auto *dy = raw(dy_), *x = raw(x_);
  auto* dx = raw(dx_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = cpu::load_raw<T>(x[i]);
    float grad;
    if (TANH) {
      // d/dx [x s(2u)] = s + x s (1 - s) 2 u',  u = k0 (x + k1 x^3)
      const float s = gelu_tanh_cdf_f32(v);
      grad = s + v * s * (1.f - s) * 2.f * kTanhK0 * (1.f + 3.f * kTanhK1 * v * v);
    } else {
      const float g = gauss_f32(v);
      grad = normal_cdf_f32(v, g) + v * kInvSqrt2Pi * g;
    }
    dx[i] = cpu::store_raw<T>(cpu::load_raw<T>(dy[i]) * grad);
  }
}

template <typename T>
PLM_VEC_CLONES void lut16_chunk(const T* x_, const uint16_t* lut, T* y_, int64_t n) {
  const auto* x = raw(x_);
  auto* y = raw(y_);
  for (int64_t i = 0; i < n; ++i) y[i] = lut[x[i]];
}

template <typename T>
PLM_VEC_CLONES void lut16_scale_chunk(const T* dy_, const T* x_, const float* lut, T* dx_, int64_t n) {
  const auto *dy = raw(dy_), *x = raw(x_);
  auto* dx = raw(dx_);
  for (int64_t i = 0; i < n; ++i) dx[i] = cpu::store_raw<T>(cpu::load_raw<T>(dy[i]) * lut[x[i]]);
}

#ifdef PLM_CPU_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same false positive, reported from the caller
namespace v512k {
using namespace cpu::v512;

inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V neg(V a) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
}
inline V abs(V a) { return _mm512_abs_ps(a); }

inline V sigmoid(V x) { return _mm512_div_ps(set1(1.f), add(set1(1.f), exp(neg(x)))); }

// exp(h + l) for h <= 0 as exp_hl_f32: the correction l joins after the range reduction.
inline V exp_hl_neg(V h, V l) {
  h = _mm512_max_ps(set1(-87.f), h);
  const V n =
      _mm512_roundscale_ps(mul(h, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm512_fnmadd_ps(n, set1(0.693145751953125f), h);
  r = add(_mm512_fnmadd_ps(n, set1(1.42860682030941723e-6f), r), l);
  V p = set1(1.f / 5040.f);
  p = fma(p, r, set1(1.f / 720.f));
  p = fma(p, r, set1(1.f / 120.f));
  p = fma(p, r, set1(1.f / 24.f));
  p = fma(p, r, set1(1.f / 6.f));
  p = fma(p, r, set1(0.5f));
  p = fma(p, r, set1(1.f));
  p = fma(p, r, set1(1.f));
  return _mm512_scalef_ps(p, n);
}

// gauss_f32, lane-wise: x^2 = hi + lo exactly by FMA (gauss_f32 splits x instead, for CPUs without FMA).
// For fp16 / bf16 inputs (11 / 8 significant bits) x * x is exact in fp32 already: lo = 0 is skipped.
template <typename T>
inline V gauss(V x) {
  const V hi = mul(x, x);
  if constexpr (!std::is_same_v<T, float>) return exp_hl_neg(mul(set1(-0.5f), hi), zero());
  return exp_hl_neg(mul(set1(-0.5f), hi), mul(set1(-0.5f), _mm512_fmsub_ps(x, x, hi)));
}

// normal_cdf_f32, lane-wise: the interval's coefficients come from the tables by a register
// permutation (16 intervals = 16 lanes), not a gather.
inline V normal_cdf(V x, V g) {
  const V a = abs(x);
  const V t = mul(a, set1(kPhiInvWidth));
  const M in_table = _mm512_cmp_ps_mask(t, set1(15.f), _CMP_LT_OQ);  // false for NaN too, as phi_interval
  const __m512i k = _mm512_cvttps_epi32(_mm512_mask_mov_ps(set1(15.f), in_table, t));
  const V u = sub(a, _mm512_permutexvar_ps(k, _mm512_load_ps(kPhiTailCentre)));
  V p = _mm512_permutexvar_ps(k, _mm512_load_ps(kPhiTailCoef[7]));
  for (int j = 6; j >= 0; --j) p = fma(p, u, _mm512_permutexvar_ps(k, _mm512_load_ps(kPhiTailCoef[j])));
  const V tail = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, set1(kPhiTop), _CMP_LT_OQ), mul(g, p));
  return _mm512_mask_mov_ps(sub(set1(1.f), tail), _mm512_cmp_ps_mask(x, zero(), _CMP_LT_OQ), tail);
}

inline V gelu_tanh_cdf(V x) {
  const V u = mul(set1(2.f * kTanhK0), fma(mul(set1(kTanhK1), x), mul(x, x), x));
  return sigmoid(u);
}

template <typename T>
void swiglu_fwd_chunk(const T* g, const T* u, T* y, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const M k = first(n - i);
    const V gv = load(g + i, k);
    store(y + i, mul(mul(gv, sigmoid(gv)), load(u + i, k)), k);
  }
}

template <typename T>
void swiglu_bwd_chunk(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const M k = first(n - i);
    const V gv = load(g + i, k), uv = load(u + i, k), d = load(dy + i, k);
    const V sig = sigmoid(gv);
    // d silu(g) / dg = sig (1 + g (1 - sig))
    const V dsilu = mul(sig, fma(gv, sub(set1(1.f), sig), set1(1.f)));
    store(dg + i, mul(mul(d, uv), dsilu), k);
    store(du + i, mul(mul(d, gv), sig), k);
  }
}

template <typename T, bool TANH>
void gelu_fwd_chunk(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const M k = first(n - i);
    const V v = load(x + i, k);
    store(y + i, mul(v, TANH ? gelu_tanh_cdf(v) : normal_cdf(v, gauss<T>(v))), k);
  }
}

template <typename T, bool TANH>
void gelu_bwd_chunk(const T* dy, const T* x, T* dx, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const M k = first(n - i);
    const V v = load(x + i, k);
    V grad;
    if (TANH) {
      // d/dx [x s(2u)] = s + x s (1 - s) 2 u',  u = k0 (x + k1 x^3)
      const V s = gelu_tanh_cdf(v);
      const V du = fma(mul(set1(3.f * kTanhK1), v), v, set1(1.f));
      grad = fma(mul(mul(v, s), sub(set1(1.f), s)), mul(set1(2.f * kTanhK0), du), s);
    } else {
      const V g = gauss<T>(v);
      grad = fma(mul(v, set1(kInvSqrt2Pi)), g, normal_cdf(v, g));
    }
    store(dx + i, mul(load(dy + i, k), grad), k);
  }
}

// y = lut[bits of x]: the exact-GELU forward of a 16-bit type by table (see gelu_lut16 below). The
// gather reads 4 bytes at lut + 2 * bits; the table has one padding entry so the last read stays inside.
template <typename T>
void lut16_chunk(const T* x, const uint16_t* lut, T* y, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const M k = first(n - i);
    const __m512i idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, x + i));
    const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, idx, lut, 2);
    _mm256_mask_storeu_epi16(y + i, k, _mm512_cvtepi32_epi16(v));  // keeps each lane's low 16 bits
  }
}

// dx = dy * lut[bits of x] (lut: the fp32 GELU derivative), rounded to T.
template <typename T>
void lut16_scale_chunk(const T* dy, const T* x, const float* lut, T* dx, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const M k = first(n - i);
    const __m512i idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, x + i));
    const V grad = _mm512_mask_i32gather_ps(zero(), k, idx, lut, 4);
    store(dx + i, mul(load(dy + i, k), grad), k);
  }
}

}  // namespace v512k
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_CPU_AVX512

// The chunk kernel of the build that runs here: `name` is one of the *_chunk templates above, defined
// in both the anonymous namespace (portable) and v512k (AVX-512).
#ifdef PLM_CPU_AVX512
#define PLM_ACT_CHUNK(name, ...) (cpu::avx512_enabled() ? v512k::name<__VA_ARGS__> : name<__VA_ARGS__>)
#else
#define PLM_ACT_CHUNK(name, ...) (name<__VA_ARGS__>)
#endif

// Calls f(row, col0, len) on every chunk of a (rows, n) problem, in parallel.
template <typename F>
void for_each_chunk(int64_t rows, int64_t n, const F& f) {
  if (rows == 0 || n == 0) return;
  const int64_t per_row = (n + CHUNK - 1) / CHUNK;
  // About 16K elements per task at least, so small calls do not pay for waking threads.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::min(n, CHUNK));
  at::parallel_for(0, rows * per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / per_row, c0 = (t % per_row) * CHUNK;
      f(r, c0, std::min(CHUNK, n - c0));
    }
  });
}

// ---- exact GELU of fp16 / bf16 by table ---------------------------------------------------------------
// A 16-bit input has only 65536 values, and the kernels compute in fp32 from the input alone, so the
// exact GELU forward (rounded to T) and its fp32 derivative are functions of the input's bits. The
// tables below hold them, computed once by the same chunk kernels over every bit pattern: looking a
// value up gives bit-for-bit what computing it would (the forward rounds the same fp32 value; the
// backward multiplies dy by the same fp32 derivative and rounds once), at a fraction of the cost of the
// erf-free normal CDF (one gather per 16 elements; 128 KiB / 256 KiB tables stay in L2).
template <typename T>
const uint16_t* gelu_lut16() {
  static const std::vector<uint16_t> lut = [] {
    std::vector<uint16_t> bits(65536);
    for (uint32_t i = 0; i < 65536; ++i) bits[i] = static_cast<uint16_t>(i);
    std::vector<uint16_t> out(65536 + 1, 0);  // + 1: the AVX-512 gather reads 4 bytes per entry
    const auto chunk = PLM_ACT_CHUNK(gelu_fwd_chunk, T, false);
    chunk(reinterpret_cast<const T*>(bits.data()), reinterpret_cast<T*>(out.data()), 65536);
    return out;
  }();
  return lut.data();
}

template <typename T>
const float* gelu_grad_lut16() {
  static const std::vector<float> lut = [] {
    // The derivative in fp32: the float kernel on every T value widened (exactly) to fp32, with dy = 1.
    std::vector<float> x(65536), ones(65536, 1.f), out(65536);
    for (uint32_t i = 0; i < 65536; ++i) x[i] = cpu::load_raw<T>(static_cast<uint16_t>(i));
    const auto chunk = PLM_ACT_CHUNK(gelu_bwd_chunk, float, false);
    chunk(ones.data(), x.data(), out.data(), 65536);
    return out;
  }();
  return lut.data();
}

// A problem whose tensors are all densely packed rows is one long row: longer chunks, fewer tasks.
struct Shape2d {
  int64_t rows, n;
};

Shape2d flat_shape(std::initializer_list<const Tensor*> ts) {
  const int64_t rows = ts.begin()[0]->size(0), n = ts.begin()[0]->size(1);
  for (const Tensor* t : ts) {
    if (rows > 1 && t->stride(0) != n) return {rows, n};
  }
  return {1, rows * n};
}

}  // namespace

Tensor swiglu_fwd_cpu(const Tensor& gate, const Tensor& up) {
  check_activation_arg(gate, gate, "gate");
  check_activation_arg(up, gate, "up");
  Tensor y = at::empty(gate.sizes(), gate.options());
  const Shape2d s = flat_shape({&gate, &up, &y});
  const int64_t sg = s.rows > 1 ? gate.stride(0) : 0, su = s.rows > 1 ? up.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const auto chunk = PLM_ACT_CHUNK(swiglu_fwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(g + r * sg + c0, u + r * su + c0, out + r * s.n + c0, len);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> swiglu_bwd_cpu(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  check_activation_arg(gate, gate, "gate");
  check_activation_arg(up, gate, "up");
  check_activation_arg(dy, gate, "dy");
  Tensor dg = at::empty(gate.sizes(), gate.options());
  Tensor du = at::empty(gate.sizes(), gate.options());
  const Shape2d s = flat_shape({&dy, &gate, &up, &dg});
  const int64_t sd = s.rows > 1 ? dy.stride(0) : 0, sg = s.rows > 1 ? gate.stride(0) : 0,
                su = s.rows > 1 ? up.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    const scalar_t* d = dy.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dup = du.mutable_data_ptr<scalar_t>();
    const auto chunk = PLM_ACT_CHUNK(swiglu_bwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      const int64_t o = r * s.n + c0;
      chunk(d + r * sd + c0, g + r * sg + c0, u + r * su + c0, dgp + o, dup + o, len);
    });
  });
  return {dg, du};
}

Tensor gelu_fwd_cpu(const Tensor& x, const std::string& approximate) {
  check_activation_arg(x, x, "x");
  const bool tanh = gelu_is_tanh(approximate);
  Tensor y = at::empty(x.sizes(), x.options());
  const Shape2d s = flat_shape({&x, &y});
  const int64_t sx = s.rows > 1 ? x.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gelu_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (!tanh) {
        const uint16_t* lut = gelu_lut16<scalar_t>();
        const auto look = PLM_ACT_CHUNK(lut16_chunk, scalar_t);
        for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
          look(xp + r * sx + c0, lut, out + r * s.n + c0, len);
        });
        return;
      }
    }
    const auto chunk =
        tanh ? PLM_ACT_CHUNK(gelu_fwd_chunk, scalar_t, true) : PLM_ACT_CHUNK(gelu_fwd_chunk, scalar_t, false);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(xp + r * sx + c0, out + r * s.n + c0, len);
    });
  });
  return y;
}

Tensor gelu_bwd_cpu(const Tensor& dy, const Tensor& x, const std::string& approximate) {
  check_activation_arg(x, x, "x");
  check_activation_arg(dy, x, "dy");
  const bool tanh = gelu_is_tanh(approximate);
  Tensor dx = at::empty(x.sizes(), x.options());
  const Shape2d s = flat_shape({&dy, &x, &dx});
  const int64_t sd = s.rows > 1 ? dy.stride(0) : 0, sx = s.rows > 1 ? x.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gelu_bwd_cpu", [&] {
    const scalar_t* d = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (!tanh) {
        const float* lut = gelu_grad_lut16<scalar_t>();
        const auto look = PLM_ACT_CHUNK(lut16_scale_chunk, scalar_t);
        for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
          look(d + r * sd + c0, xp + r * sx + c0, lut, out + r * s.n + c0, len);
        });
        return;
      }
    }
    const auto chunk =
        tanh ? PLM_ACT_CHUNK(gelu_bwd_chunk, scalar_t, true) : PLM_ACT_CHUNK(gelu_bwd_chunk, scalar_t, false);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(d + r * sd + c0, xp + r * sx + c0, out + r * s.n + c0, len);
    });
  });
  return dx;
}

}  // namespace plm_engine
