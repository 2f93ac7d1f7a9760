// AVX-512 building blocks for the pointwise and row-reduction CPU kernels (softmax, cross-entropy,
// activations): fp32 / bf16 / fp16 vector loads and stores with tail masks, exp, and the run-time
// switch that says whether the AVX-512 kernels may run.
//
// Why intrinsics: GCC does not vectorise the 16-bit conversion loops of the portable kernels well
// (measured: bf16 softmax 0.15-0.2x eager, bf16 SwiGLU/GELU 0.01-0.46x), while bf16 -> fp32 is one
// shift and fp32 -> fp16 one instruction here. Everything below sits in a `#pragma GCC target` region,
// as in norms.cpp, so the extension is still built without -march and runs on any x86-64; only our
// own code is in the region (all headers are included first), so no header code is compiled for
// AVX-512. A .cpp that includes this file puts its AVX-512 kernels in a region of its own and calls
// them only when avx512_enabled().
//
// Tails: every loop runs whole 16-lane vectors and finishes with one masked vector, so a row's result
// does not depend on where a thread's chunk starts or ends (thread-count independent).
#pragma once
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PLM_CPU_AVX512 1
#include <immintrin.h>
#endif

// fp32, fp16 and bf16: what the kernels' argument checks accept (the AVX-512 loads cover these).
#define PLM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace plm_engine {
namespace cpu {

// True when the CPU (and OS) support AVX-512F/BW/VL/DQ with FMA and F16C and PLM_ENGINE_CPU_ISA does
// not cap the choice at "generic" or "avx2" (the same variable and values as norms.cpp / attention.cpp).
inline bool avx512_enabled() {
  static const bool on = [] {
#ifdef PLM_CPU_AVX512
    __builtin_cpu_init();
    bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (const char* env = std::getenv("PLM_ENGINE_CPU_ISA")) {
      const std::string want(env);
      if (want == "generic" || want == "avx2") ok = false;
    }
    return ok;
#else
    return false;
#endif
  }();
  return on;
}

}  // namespace cpu
}  // namespace plm_engine

#ifdef PLM_CPU_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 flags the intrinsics' deliberately undefined vectors (_mm512_undefined_*) as maybe
// uninitialised once inlined (GCC bug 105593, fixed in GCC 13): a false positive. The kernels' own
// regions in the .cpp files repeat this, since the warning is reported where the helpers are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace plm_engine {
namespace cpu {
namespace v512 {

using V = __m512;
using M = __mmask16;
constexpr int64_t W = 16;

// Lanes [0, n) of one vector (all 16 for n >= 16).
inline M first(int64_t n) { return n >= W ? static_cast<M>(0xffff) : static_cast<M>((1u << n) - 1u); }

inline V set1(float a) { return _mm512_set1_ps(a); }
inline V zero() { return _mm512_setzero_ps(); }

// ---- loads (masked-off lanes read as 0, touching no memory) and stores (masked-off lanes untouched) ----

inline V from_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

// Round to nearest even like c10::BFloat16 (add 0x7fff plus the lowest kept bit); NaN -> 0x7fc0.
// Not VCVTNEPS2BF16 (AVX512_BF16): it flushes denormals, which c10 and PyTorch eager keep.
inline __m256i to_bf16(V v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const c10::BFloat16* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline V load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
inline V load(const c10::BFloat16* p, M m) { return from_bf16(_mm256_maskz_loadu_epi16(m, p)); }
inline V load(const c10::Half* p, M m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void store(c10::BFloat16* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
inline void store(c10::Half* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store(c10::BFloat16* p, V v, M m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }
inline void store(c10::Half* p, V v, M m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// ---- math -----------------------------------------------------------------------------------------

// e^x, the same method as the scalar cpu::exp_approx (softmax.h): x = k ln2 + r with |r| <= ln2 / 2 and
// a two-part ln2 (with FMA), e^r by its degree-7 Taylor polynomial (truncation < 6e-9 relative), then
// 2^k by VSCALEFPS. Inputs below -87.3 (and -inf) give exactly 0, so masked or -inf entries vanish;
// inputs above 88 are clamped (results stay finite); NaN stays NaN.
inline V exp(V x) {
  const M under = _mm512_cmp_ps_mask(x, set1(-87.3f), _CMP_LT_OQ);
  // min/max return their second operand when one is NaN: written this way round, NaN passes through.
  x = _mm512_max_ps(set1(-87.3f), _mm512_min_ps(set1(88.f), x));
  const V k = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm512_fnmadd_ps(k, set1(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, set1(1.42860682030941723e-6f), r);
  V p = set1(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, set1(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, set1(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, set1(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, set1(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, set1(0.5f));
  p = _mm512_fmadd_ps(p, r, set1(1.f));
  p = _mm512_fmadd_ps(p, r, set1(1.f));
  return _mm512_maskz_mov_ps(static_cast<M>(~under), _mm512_scalef_ps(p, k));
}

// ---- the online (max, sum of exp) of a row, keeping the exponentials ---------------------------------

constexpr int64_t kBlock = 2048;  // columns per block: the block's fp32 values stay in L1 between passes

struct RowExp {
  float m;       // max of the scaled row (-inf when every entry is -inf or the row is empty)
  float s;       // sum of exp(v - m)
  bool nan;      // the row holds a NaN
};

// For v = scale * x[0 .. n): fills e[i] = exp(v_i - bm[b]) where bm[b] is the running max when block b
// (columns b * kBlock ...) was reached, so exp(v_i - m) = e[i] * exp(bm[b] - m) with the final max m;
// bm[b] = -inf marks a block whose entries are all -inf (its e[] is 0). Reading x once and keeping the
// exponentials (in L2 for rows up to ~64K columns) costs one exp per element instead of two.
// Also returns sum(x) (unscaled) in *sum_x when sum_x is not null (label smoothing needs it).
template <typename T>
inline RowExp row_exp(const T* x, int64_t n, float scale, float* e, float* bm, float* sum_x) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const V vscale = set1(scale);
  float m = kNegInf, s = 0.f;
  bool nan = false;
  V vsx = zero();
  for (int64_t b0 = 0, blk = 0; b0 < n; b0 += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - b0);
    float* eb = e + b0;
    V vm = set1(kNegInf);
    M unord = 0;
    for (int64_t i = 0; i < len; i += W) {
      const M k = first(len - i);
      const V xv = load(x + b0 + i, k);
      if (sum_x != nullptr) vsx = _mm512_add_ps(vsx, xv);
      const V v = _mm512_mul_ps(xv, vscale);
      unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      store(eb + i, v, k);
      vm = _mm512_mask_max_ps(vm, k, vm, v);
    }
    nan = nan || unord != 0;
    const float blk_max = _mm512_reduce_max_ps(vm);
    if (blk_max == kNegInf) {  // nothing but -inf: contributes exp(-inf) = 0
      bm[blk] = kNegInf;
      for (int64_t i = 0; i < len; i += W) store(eb + i, zero(), first(len - i));  // not -inf * 0 later
      continue;
    }
    if (blk_max > m) {
      s = (m == kNegInf) ? 0.f : s * _mm512_cvtss_f32(exp(set1(m - blk_max)));
      m = blk_max;
    }
    bm[blk] = m;
    const V vmax = set1(m);
    V acc = zero();
    for (int64_t i = 0; i < len; i += W) {
      const M k = first(len - i);
      const V ev = exp(_mm512_sub_ps(load(eb + i, k), vmax));
      store(eb + i, ev, k);
      acc = _mm512_mask_add_ps(acc, k, acc, ev);
    }
    s += _mm512_reduce_add_ps(acc);
  }
  if (sum_x != nullptr) *sum_x = _mm512_reduce_add_ps(vsx);
  return {m, s, nan};
}

// The factor that turns block b's e[] into softmax values: exp(bm[b] - m) * inv (0 for -inf blocks).
inline float block_factor(float bm, float m, float inv) {
  if (bm == -std::numeric_limits<float>::infinity()) return 0.f;
  return _mm512_cvtss_f32(exp(set1(bm - m))) * inv;
}

}  // namespace v512
}  // namespace cpu
}  // namespace plm_engine
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_CPU_AVX512
