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
#include "common/cpu_memory.h"
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
// degree-7 Taylor polynomial. l joins after the reduction, so h + l itself is never rounded. Used by
// sigmoid (SwiGLU, tanh GELU); the exact GELU has its own table-based exp (exp_neg_hl_f32).
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
// Phi(-a) = exp(-a^2 / 2) S(a) for a = |x|, where S(a) = Phi(-a) e^(a^2/2) is smooth (0.5 at 0, ~1/(a
// sqrt(2 pi)) for large a). Phi(-a) is then accurate relative to itself everywhere, so GELU has no
// cancellation in the x << 0 tail (unlike PyTorch's x (1 + erf(x / sqrt 2)) / 2), and there is no
// division. Beyond a = 13.2, Phi(-a) < 1e-39 (an fp32 denormal) and is taken as 0.
//
// Cost, not accuracy, decides the shapes below (fp32 GELU must keep up with PyTorch eager's erf):
//  - S is a piecewise polynomial over 32 intervals of a, so that one VPERMT2PS (a 32-entry register
//    table) fetches each coefficient with no gather; degree 5 in the interval's own variable u in
//    [-0.5, 0.5]. Fitted for this file: Lawson's iteratively reweighted least squares toward the minimax
//    relative error on 3000 Chebyshev nodes per interval, against fp64 0.5 erfcx(a / sqrt 2). Max
//    relative error of the fit 2.7e-8; evaluated in fp32 with the coefficients rounded (100k points per
//    interval) 1.2e-7, about 2 ulp.
//  - exp(-a^2 / 2) by a 32-entry table of 2^(j/32) and a degree-3 polynomial on |r| <= ln2 / 64 (Taylor
//    remainder 6e-10), with the table's exponent trick (below): ~2 ulp, and no VSCALEFPS or clamp.
// The interval of a is k = round(a * kPhiInvWidth): interval k is centred at k / kPhiInvWidth, so
// interval 0 is half wide and interval 31 ends at 31.5 / kPhiInvWidth = kPhiTop.
constexpr float kPhiTop = 13.2f;
constexpr float kPhiInvWidth = 2.3863637447357178f;  // fp32(31.5 / 13.2); the fit used this exact value
constexpr float kRound = 12582912.f;                 // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
// kPhiCoef[j][k]: coefficient of u^j on interval k (one aligned 32-float row per j: two 16-lane halves
// for VPERMT2PS).
alignas(64) constexpr float kPhiCoef[6][32] = {
    {0.5f, 0.3685714602470398f, 0.28555941581726074f, 0.2299734652042389f, 0.190903440117836f, 0.16231460869312286f, 0.14068248867988586f, 0.12384870648384094f, 0.11043568700551987f, 0.09953178465366364f, 0.09051427990198135f, 0.0829458087682724f, 0.07651153951883316f, 0.07097984850406647f, 0.06617702543735504f, 0.06197049841284752f, 0.05825751647353172f, 0.0549573190510273f, 0.05200563371181488f, 0.04935070872306824f, 0.04695044830441475f, 0.04477027431130409f, 0.042781535536050797f, 0.04096031188964844f, 0.03928647190332413f, 0.03774295747280121f, 0.03631523251533508f, 0.0349908247590065f, 0.033758990466594696f, 0.03261040151119232f, 0.03153694421052933f, 0.03053152561187744f},
    {-0.167175754904747f, -0.10245432704687119f, -0.06688683480024338f, -0.046025171875953674f, -0.03308454528450966f, -0.02466285228729248f, -0.018951989710330963f, -0.014940203167498112f, -0.012034963816404343f, -0.009874973446130753f, -0.008231918327510357f, -0.006956863682717085f, -0.0059498753398656845f, -0.005142181180417538f, -0.004485373850911856f, -0.003944679629057646f, -0.0034946580417454243f, -0.00311638368293643f, -0.0027955658733844757f, -0.0025212636683136225f, -0.0022849952802062035f, -0.0020801096688956022f, -0.0019013355486094952f, -0.001744454842992127f, -0.001606061472557485f, -0.0014833819586783648f, -0.0013741409638896585f, -0.0012764575658366084f, -0.001188766909763217f, -0.0011097590904682875f, -0.0010383304907009006f, -0.0009735468192957342f},
    {0.043899036943912506f, 0.023364489898085594f, 0.013326579704880714f, 0.008068566210567951f, 0.005142006557434797f, 0.003424224676564336f, 0.0023680145386606455f, 0.0016916700406000018f, 0.0012428981717675924f, 0.0009356896043755114f, 0.0007195326033979654f, 0.0005637053982354701f, 0.00044892632286064327f, 0.0003627469122875482f, 0.00029692306998185813f, 0.0002458679082337767f, 0.0002057154051726684f, 0.0001737391867209226f, 0.00014798299525864422f, 0.00012702083040494472f, 0.00010979803482769057f, 9.552416304359213e-05f, 8.359944331459701e-05f, 7.356362766586244e-05f, 6.505978672066703e-05f, 5.780843639513478e-05f, 5.1588707719929516e-05f, 4.622459891834296e-05f, 4.157474177191034e-05f, 3.7524754588957876e-05f, 3.3981428714469075e-05f, 3.086833385168575e-05f},
    {-0.009775245562195778f, -0.004629381932318211f, -0.002354986732825637f, -0.0012771494220942259f, -0.0007326232152990997f, -0.0004414366849232465f, -0.0002776730398181826f, -0.00018136440485250205f, -0.00012243764649610966f, -8.509319741278887e-05f, -6.067481081117876e-05f, -4.425708175403997e-05f, -3.2940053642960265e-05f, -2.496270462870598e-05f, -1.922525916597806e-05f, -1.5023199011920951e-05f, -1.1894627277797554e-05f, -9.530251190881245e-06f, -7.718913366261404e-06f, -6.3138777477433905e-06f, -5.211499228607863e-06f, -4.3374598135415e-06f, -3.637726422311971e-06f, -3.0725066153536318e-06f, -2.6121433620573953e-06f, -2.23428742174292e-06f, -1.921921239045332e-06f, -1.661962869548006e-06f, -1.4442634892475326e-06f, -1.2608832093974343e-06f, -1.1055615232180571e-06f, -9.733241768117296e-07f},
    {0.0018873783992603421f, 0.0008300983463414013f, 0.00038121326360851526f, 0.00018722907407209277f, 9.762414993019775e-05f, 5.36803127033636e-05f, 3.094122439506464e-05f, 1.859545591287315e-05f, 1.1597936463658698e-05f, 7.476005976059241e-06f, 4.962619186699158e-06f, 3.3817584608186735e-06f, 2.359271320528933e-06f, 1.681056346569676e-06f, 1.220822696268442e-06f, 9.019839239954308e-07f, 6.769056994926359e-07f, 5.152660378371365e-07f, 3.973487423536426e-07f, 3.100801961863908e-07f, 2.446338953632221e-07f, 1.9495061565066862e-07f, 1.5680618048463657e-07f, 1.2721332609544334e-07f, 1.0403122985280788e-07f, 8.570657428208506e-08f, 7.109924382575628e-08f, 5.936330538247603e-08f, 4.986472745827086e-08f, 4.212378357237867e-08f, 3.57742422352203e-08f, 3.05341671946735e-08f},
    {-0.00026974844513460994f, -0.000134422502014786f, -5.641833195113577e-05f, -2.5370047296746634e-05f, -1.2140278158767615e-05f, -6.14340569882188e-06f, -3.268612999818288e-06f, -1.8189977026850102e-06f, -1.053878463608271e-06f, -6.330477049232286e-07f, -3.9280135410990624e-07f, -2.5095113187489915e-07f, -1.6460400331652636e-07f, -1.10567988542698e-07f, -7.589066086666207e-08f, -5.312056572392976e-08f, -3.785270763501103e-08f, -2.7417117465233787e-08f, -2.0157790103780826e-08f, -1.5025589661377126e-08f, -1.1342682348924882e-08f, -8.663107564643724e-09f, -6.6884737748296175e-09f, -5.2159756513958655e-09f, -4.105751738592289e-09f, -3.2600275812200152e-09f, -2.609578109158406e-09f, -2.104804330826937e-09f, -1.7097741000782207e-09f, -1.3981750202063381e-09f, -1.1505537633738072e-09f, -9.523954958012837e-10f},
};

// exp(h + l) for h in [-87.2, 0] (a < kPhiTop) and a small correction l: k = round(h * 16 / ln2),
// r = h - k ln2 / 16 + l (ln2 / 16 = kExpC1 + kExpC2, kExpC1 with 12 significant bits so that k * kExpC1
// is exact without FMA), e^h = 2^(k / 16) e^r with e^r by its degree-3 Taylor polynomial (|r| <= ln2 / 32:
// remainder 9e-9). 2^(k/16) = 2^(k >> 4) 2^(j/16), j = k & 15, in one integer add: kExp2Bits[j] holds
// bits(2^(j/16)) - (j << 19), so kExp2Bits[j] + (k << 19) puts k >> 4 into the exponent field (k is the
// low bits of h * 16 / ln2 + kRound, whose own high bits shift out). Valid while the result is a normal
// number, which a < kPhiTop guarantees (e^-87.12 > 2^-126); the callers zero the lanes outside. l joins
// after the reduction, so h + l itself is never rounded. ~2 ulp.
constexpr float kExpK = 23.083120346069336f;          // 16 / ln2
constexpr float kExpC1 = 0.0433197021484375f;         // 2839 / 2^16
constexpr float kExpC2 = 1.9966364561696537e-06f;     // ln2 / 16 - kExpC1
alignas(64) constexpr uint32_t kExp2Bits[16] = {
    0x3f800000, 0x3f7daac3, 0x3f7b95c2, 0x3f79c3d3, 0x3f7837f0, 0x3f76f532, 0x3f75fed7, 0x3f75583f,
    0x3f7504f3, 0x3f7508a4, 0x3f75672a, 0x3f76248c, 0x3f7744fd, 0x3f78ccdf, 0x3f7ac0c7, 0x3f7d257d,
};

inline float exp_neg_hl_f32(float h, float l) {
  const float tm = h * kExpK + kRound;
  const float kf = tm - kRound;
  const float r = (h - kf * kExpC1) - kf * kExpC2 + l;
  const float p = ((r * (1.f / 6) + 0.5f) * r + 1.f) * r + 1.f;
  const uint32_t k = cpu::f32_to_bits(tm);  // unsigned: the shift wraps, as intended
  return cpu::bits_to_f32(kExp2Bits[k & 15u] + (k << 19)) * p;
}

// exp(-x^2 / 2) with x^2 computed exactly (0 for |x| >= kPhiTop and NaN): x splits (Veltkamp, by masking
// the low 12 mantissa bits) into xh + xl with xh * xh exact, and the small rest joins exp after its range
// reduction. Without the split, x^2's rounding (2^-24 x^2 / 2 absolute) would cost up to 40 ulp at |x| = 13.
inline float gauss_f32(float x) {
  const float xh = cpu::bits_to_f32(cpu::f32_to_bits(x) & 0xfffff000u), xl = x - xh;
  const float g = exp_neg_hl_f32(-0.5f * (xh * xh), -0.5f * (xl * (xh + xh + xl)));
  return (x < kPhiTop && x > -kPhiTop) ? g : 0.f;
}

// Phi(x) given g = gauss_f32(x).
inline float normal_cdf_f32(float x, float g) {
  const float a = x < 0.f ? -x : x;
  const float t = a * kPhiInvWidth;
  const float tm = t + kRound;
  const float u = t - (tm - kRound);
  const uint32_t k = cpu::f32_to_bits(tm) & 31u;  // wraps beyond the table (and for NaN): masked below
  float p = kPhiCoef[5][k];
  for (int j = 4; j >= 0; --j) p = p * u + kPhiCoef[j][k];
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

// 32-entry table lookup: lane i gets tab[idx_i & 31] (VPERMT2PS; the index's higher bits are ignored).
inline V lookup32(const float* tab, __m512i idx) {
  return _mm512_permutex2var_ps(_mm512_load_ps(tab), idx, _mm512_load_ps(tab + 16));
}

// gauss_f32 of a (= |x|), lane-wise, for a < kPhiTop (in_range; other lanes 0). In s = -2 r = a^2 + 2 k
// ln2 / 16 rather than r (e^r = 1 - s/2 + s^2/8 - s^3/48): k * 2 kExpC1 is exact, so one FMA forms
// a^2 + 2 k kExpC1 exactly before its single rounding, relative to the small s; a^2 needs no hi/lo split.
inline V gauss(V a, M in_range) {
  const V tm = fma(mul(a, a), set1(-0.5f * kExpK), set1(kRound));  // only picks k: rounding is harmless
  const V kf = sub(tm, set1(kRound));
  V s = fma(a, a, mul(kf, set1(2.f * kExpC1)));
  s = fma(kf, set1(2.f * kExpC2), s);
  V p = fma(set1(-1.f / 48), s, set1(1.f / 8));
  p = fma(p, s, set1(-0.5f));
  p = fma(p, s, set1(1.f));
  const __m512i k = _mm512_castps_si512(tm);
  const __m512i tab = _mm512_permutexvar_epi32(k, _mm512_load_si512(kExp2Bits));  // VPERMD: low 4 bits of k
  return _mm512_maskz_mul_ps(in_range, p, _mm512_castsi512_ps(_mm512_add_epi32(tab, _mm512_slli_epi32(k, 19))));
}

// Phi(-a) for a = min(|x|, kPhiTop) given g = gauss(x) (normal_cdf_f32's tail): the interval's
// coefficients come from the tables by register permutation, not a gather; the interval index is the low
// bits of a * kPhiInvWidth + kRound.
inline V normal_tail(V a, M in_range, V g) {
  const V t = mul(a, set1(kPhiInvWidth));  // then adds only: they run beside the FMAs, on other ports
  const V tm = add(t, set1(kRound));
  const V u = sub(t, sub(tm, set1(kRound)));
  const __m512i k = _mm512_castps_si512(tm);
  V p = lookup32(kPhiCoef[5], k);
  for (int j = 4; j >= 0; --j) p = fma(p, u, lookup32(kPhiCoef[j], k));
  return _mm512_maskz_mul_ps(in_range, g, p);  // also clears wrapped indices (a = kPhiTop) and NaN
}

// Software prefetch of the line(s) holding p[0 .. 2W): one 2W step of the unrolled loops below.
constexpr int64_t kPrefetchAhead = 2048;
template <typename T>
inline void prefetch(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  if constexpr (sizeof(T) == 4) _mm_prefetch(reinterpret_cast<const char*>(p + W), _MM_HINT_T0);
}

// GELU x Phi(x) and, when grad is not null, its derivative Phi(x) + x phi(x): one exp serves both.
// The forward is max(x, 0) - a Phi(-a): x - x Phi(-x) for x >= 0 and x Phi(x) for x < 0, with no select.
// a is clamped at kPhiTop (where Phi(-a) is 0) so that x = +-inf gives inf / 0, not inf * 0 = NaN;
// max(0, x) keeps a NaN x (VMAXPS returns its second operand when one is NaN).
inline V gelu_exact(V x, V* grad) {
  const V a = _mm512_range_ps(x, set1(kPhiTop), 0x0a);  // min(|x|, kPhiTop) in one VRANGEPS; NaN stays
  const M in_range = _mm512_cmp_ps_mask(a, set1(kPhiTop), _CMP_LT_OQ);
  const V g = gauss(a, in_range);
  const V tail = normal_tail(a, in_range, g);
  if (grad != nullptr) {
    const M nonneg = static_cast<M>(~_mm512_movepi32_mask(_mm512_castps_si512(x)));  // sign bit clear
    const V cdf = _mm512_mask_sub_ps(tail, nonneg, set1(1.f), tail);
    *grad = fma(mul(x, set1(kInvSqrt2Pi)), g, cdf);
  }
  return _mm512_fnmadd_ps(a, tail, _mm512_max_ps(zero(), x));
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
  int64_t i = 0;
  if constexpr (!TANH) {
    // Two vectors per step: two independent dependency chains (exp and the CDF polynomial are serial
    // FMA chains), and one tail mask computation per 32 elements. The software prefetch 8 KiB (fp32)
    // ahead measured a few % on tensors that stream from DRAM (8192 x 1536), where the hardware
    // prefetcher alone left eager ahead; prefetches never fault, so reading past the chunk is harmless.
    for (; i + 2 * W <= n; i += 2 * W) {
      prefetch(x + i + kPrefetchAhead);
      const V v0 = load(x + i), v1 = load(x + i + W);
      store(y + i, gelu_exact(v0, nullptr));
      store(y + i + W, gelu_exact(v1, nullptr));
    }
  }
  for (; i < n; i += W) {
    const M k = first(n - i);
    const V v = load(x + i, k);
    store(y + i, TANH ? mul(v, gelu_tanh_cdf(v)) : gelu_exact(v, nullptr), k);
  }
}

template <typename T, bool TANH>
void gelu_bwd_chunk(const T* dy, const T* x, T* dx, int64_t n) {
  int64_t i = 0;
  if constexpr (!TANH) {
    for (; i + 2 * W <= n; i += 2 * W) {
      V g0, g1;
      prefetch(x + i + kPrefetchAhead);
      prefetch(dy + i + kPrefetchAhead);
      gelu_exact(load(x + i), &g0);
      gelu_exact(load(x + i + W), &g1);
      store(dx + i, mul(load(dy + i), g0));
      store(dx + i + W, mul(load(dy + i + W), g1));
    }
  }
  for (; i < n; i += W) {
    const M k = first(n - i);
    const V v = load(x + i, k);
    V grad;
    if (TANH) {
      // d/dx [x s(2u)] = s + x s (1 - s) 2 u',  u = k0 (x + k1 x^3)
      const V s = gelu_tanh_cdf(v);
      const V du = fma(mul(set1(3.f * kTanhK1), v), v, set1(1.f));
      grad = fma(mul(mul(v, s), sub(set1(1.f), s)), mul(set1(2.f * kTanhK0), du), s);
    } else {
      gelu_exact(v, &grad);
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
  Tensor y = cpu::empty_output(gate.sizes(), gate.options());
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
  Tensor dg = cpu::empty_output(gate.sizes(), gate.options());
  Tensor du = cpu::empty_output(gate.sizes(), gate.options());
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
  Tensor y = cpu::empty_output(x.sizes(), x.options());
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
  Tensor dx = cpu::empty_output(x.sizes(), x.options());
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
