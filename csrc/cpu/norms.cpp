// LayerNorm / RMSNorm on the CPU, with the optional fused residual add.
//
// OpenMP over rows (at::parallel_for); each thread reads a row from memory once, keeps it in L1/L2 for
// the centred two-pass variance and the output, and writes each output once. Statistics in fp32.
//
// Three builds of the row kernels live in one binary, chosen once at run time (cpu_isa()):
//   avx512   AVX-512F/BW/VL/DQ + FMA + F16C intrinsics   (norms_simd.inc with the Avx512 policy)
//   avx2     AVX2 + FMA + F16C intrinsics                (norms_simd.inc with the Avx2 policy)
//   generic  plain loops the compiler vectorises for the baseline ISA (SSE2, NEON, ...)
// The SIMD builds come from `#pragma GCC target` regions, not -march flags, so the wheel stays portable.
// PLM_ENGINE_CPU_ISA=generic|avx2|avx512 caps the choice (to test every build on one machine).
//
// Memory-bound tricks, measured on a 2-core AVX-512 machine (fp32 4096x4096; benchmarks/bench_norms.py):
//  - transparent huge pages for fresh large outputs (empty_output): first-touch page faults on a fresh
//    64 MiB buffer cost several times the kernel itself (~3x faster forward with them);
//  - non-temporal (streaming) stores for outputs far larger than the caches (kStreamMinBytes): a normal
//    store first reads the line it overwrites (read-for-ownership). On reused memory this made the
//    forward ~1.4x faster; on freshly faulted huge pages it is neutral; on outputs that could stay in
//    L3, and on fresh 4 KiB pages (no huge pages), it is slower, so neither streams;
//  - software prefetch of the next row was slower than the hardware prefetchers: not used.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC's `#pragma GCC target` regions build the SIMD kernels; other compilers get the generic loops.
#define PLM_NORMS_X86_SIMD 1
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/cpu_memory.h"
#include "ops.h"

namespace plm_engine {
namespace {

// ---- arguments shared by every build of the row kernels ------------------------------------------

template <typename T, typename Wt>
struct NormFwdArgs {
  const T* x;
  const T* res;  // nullptr: no residual
  const Wt* w;
  const Wt* b;  // nullptr: no bias
  T* y;
  T* h;         // x + res, written only with a residual
  float* mean;  // unused for RMSNorm
  float* rstd;
  int64_t n;
  float eps;
  bool is_rms;
  bool stream;  // use non-temporal stores for y and h
};

template <typename T, typename Wt>
struct NormBwdArgs {
  const T* dy;
  const T* dh;  // nullptr: no gradient into h
  const T* h;
  const Wt* w;
  const float* mean;  // unused for RMSNorm
  const float* rstd;
  T* dx;
  int64_t n;
  bool is_rms;
  bool stream;  // use non-temporal stores for dx
};

// ---- generic build: plain loops ------------------------------------------------------------------

namespace generic {

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// c10's float -> bfloat16 rounding branches on NaN, which keeps the compiler from vectorising the
// loops; this is the same rounding (to nearest even, NaN -> 0x7fc0) as a select.
inline float to_f(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T from_f(float f) {
  return static_cast<T>(f);
}

template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

template <typename T, typename Wt>
void norm_fwd_rows(const NormFwdArgs<T, Wt>& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  // fp32 inputs are normalised in place from x; other dtypes and the residual sum go through an fp32
  // scratch row so the inner loops stay simple fp32 loops the compiler vectorises.
  const bool need_scratch = a.res != nullptr || !std::is_same_v<T, float>;
  std::vector<float> buf(need_scratch ? n : 0);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * n;
    const float* v;
    if (a.res != nullptr) {
      const T* x = a.x + off;
      const T* res = a.res + off;
      T* h = a.h + off;
      for (int64_t i = 0; i < n; ++i) h[i] = from_f<T>(to_f(x[i]) + to_f(res[i]));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = to_f(h[i]);
      v = buf.data();
    } else if constexpr (std::is_same_v<T, float>) {
      v = a.x + off;
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = to_f(a.x[off + i]);
      v = buf.data();
    }
    float mu = 0.f;
    if (!a.is_rms) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) s += v[i];
      mu = s / n;
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += (v[i] - mu) * (v[i] - mu);
    const float rstd = 1.f / std::sqrt(ss / n + a.eps);
    if (!a.is_rms) a.mean[r] = mu;
    a.rstd[r] = rstd;
    T* y = a.y + off;
    if (a.b != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = from_f<T>((v[i] - mu) * rstd * to_f(a.w[i]) + to_f(a.b[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = from_f<T>((v[i] - mu) * rstd * to_f(a.w[i]));
    }
  }
}

template <typename T, typename Wt>
void norm_bwd_rows(const NormBwdArgs<T, Wt>& a, int64_t begin, int64_t end, float* dw, float* db) {
  const int64_t n = a.n;
  std::vector<float> hat_buf(n), wdy_buf(n);
  float* hat = hat_buf.data();
  float* wdy = wdy_buf.data();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * n;
    const float mu = a.is_rms ? 0.f : a.mean[r];
    const float rs = a.rstd[r];
    const T* h = a.h + off;
    const T* dy = a.dy + off;
    float c1 = 0.f, c2 = 0.f;
#pragma omp simd reduction(+ : c1, c2)
    for (int64_t i = 0; i < n; ++i) {
      const float g = to_f(dy[i]);
      hat[i] = (to_f(h[i]) - mu) * rs;
      wdy[i] = g * to_f(a.w[i]);
      c1 += hat[i] * wdy[i];
      c2 += wdy[i];
      dw[i] += g * hat[i];
    }
    if (db != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) db[i] += to_f(dy[i]);
    }
    c1 /= n;
    c2 = a.is_rms ? 0.f : c2 / n;
    T* dx = a.dx + off;
    if (a.dh != nullptr) {
      const T* dh = a.dh + off;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dx[i] = from_f<T>((wdy[i] - hat[i] * c1 - c2) * rs + to_f(dh[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dx[i] = from_f<T>((wdy[i] - hat[i] * c1 - c2) * rs);
    }
  }
}

}  // namespace generic

#ifdef PLM_NORMS_X86_SIMD
// ---- AVX2 build -----------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

// 8 fp32 lanes. bf16 <-> fp32 by bit shifts (bf16 is the top half of an fp32); fp16 with F16C.
struct Avx2 {
  using V = __m256;
  static constexpr int64_t W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void fence() { _mm_sfence(); }

  static V from_bf16(__m128i bits) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)); }
  // Round to nearest even like c10::BFloat16: add 0x7fff plus the lowest kept bit; NaN -> 0x7fc0.
  static __m128i to_bf16(V v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // packus works within 128-bit lanes: gather the two halves' results into the low 128 bits.
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
  }
  static V from_half(__m128i bits) { return _mm256_cvtph_ps(bits); }
  static __m128i to_half(V v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::BFloat16* p) { return from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load(const c10::Half* p) { return from_half(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static void store(c10::Half* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static void stream(c10::BFloat16* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static void stream(c10::Half* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
  template <typename T>
  static V round_to(V v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) return from_bf16(to_bf16(v));
    else if constexpr (std::is_same_v<T, c10::Half>) return from_half(to_half(v));
    else return v;
  }
};

using Vec = Avx2;
#include "norms_simd.inc"

}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512 build --------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 flags the intrinsics' deliberately undefined vectors (_mm512_undefined_*) as maybe
// uninitialised once inlined (GCC bug 105593, fixed in GCC 13): a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {

// 16 fp32 lanes; 16-bit types travel as 256-bit halves.
struct Avx512 {
  using V = __m512;
  static constexpr int64_t W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  static void fence() { _mm_sfence(); }

  static V from_bf16(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
  // Round to nearest even like c10::BFloat16: add 0x7fff plus the lowest kept bit; NaN -> 0x7fc0.
  static __m256i to_bf16(V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  static V from_half(__m256i bits) { return _mm512_cvtph_ps(bits); }
  static __m256i to_half(V v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::BFloat16* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load(const c10::Half* p) { return from_half(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void store(c10::Half* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static void stream(c10::BFloat16* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void stream(c10::Half* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
  template <typename T>
  static V round_to(V v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) return from_bf16(to_bf16(v));
    else if constexpr (std::is_same_v<T, c10::Half>) return from_half(to_half(v));
    else return v;
  }
};

using Vec = Avx512;
#include "norms_simd.inc"

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_NORMS_X86_SIMD

// ---- run-time choice ------------------------------------------------------------------------------

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::kGeneric;
#ifdef PLM_NORMS_X86_SIMD
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2) best = CpuIsa::kAvx2;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = CpuIsa::kAvx512;
#endif
  if (const char* env = std::getenv("PLM_ENGINE_CPU_ISA")) {
    const std::string want(env);
    const CpuIsa cap = want == "generic" ? CpuIsa::kGeneric : want == "avx2" ? CpuIsa::kAvx2 : CpuIsa::kAvx512;
    best = std::min(best, cap);
  }
  return best;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

template <typename T, typename Wt>
void fwd_rows(const NormFwdArgs<T, Wt>& a, int64_t begin, int64_t end) {
#ifdef PLM_NORMS_X86_SIMD
  if (cpu_isa() == CpuIsa::kAvx512) return avx512::norm_fwd_rows(a, begin, end);
  if (cpu_isa() == CpuIsa::kAvx2) return avx2::norm_fwd_rows(a, begin, end);
#endif
  generic::norm_fwd_rows(a, begin, end);
}

template <typename T, typename Wt>
void bwd_rows(const NormBwdArgs<T, Wt>& a, int64_t begin, int64_t end, float* dw, float* db) {
#ifdef PLM_NORMS_X86_SIMD
  if (cpu_isa() == CpuIsa::kAvx512) return avx512::norm_bwd_rows(a, begin, end, dw, db);
  if (cpu_isa() == CpuIsa::kAvx2) return avx2::norm_bwd_rows(a, begin, end, dw, db);
#endif
  generic::norm_bwd_rows(a, begin, end, dw, db);
}

// ---- memory ---------------------------------------------------------------------------------------

// Outputs at least this large (in total) are written with non-temporal stores. Twice a typical last-level
// cache (32 MiB per CCX / socket slice): such outputs cannot stay cached for the next op anyway, so
// skipping the read-for-ownership is free bandwidth (~1.4x on the forward with reused memory). Smaller
// outputs are stored normally: they partly stay in L3, where the next op (and the allocator's next
// reuse of the same memory) finds them; streaming them measured up to 1.4x slower at 32 MiB of output.
// (sysconf's L3 size is no guide: in a VM it can report the whole host socket.)
constexpr int64_t kStreamMinBytes = int64_t{64} << 20;

// Elements a thread should get at least (ATen's GRAIN_SIZE): smaller problems run on one thread,
// where waking the OpenMP team would cost more than it saves.
constexpr int64_t kGrainElems = 32768;

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, (kGrainElems + elems_per_item - 1) / std::max<int64_t>(1, elems_per_item));
}

using cpu::empty_output;
using cpu::huge_pages_enabled;

// Non-temporal stores for this many output bytes? Only for outputs past kStreamMinBytes, and only when
// they get huge pages: a fresh 4 KiB page is zeroed by the kernel at first touch and is still in cache,
// so streaming over it writes each line twice (LayerNorm forward without huge pages: 0.8x eager with
// streaming, 0.9-1.0x without). Zeroing a 2 MiB page leaves little of it in L2, and streaming is then
// neutral to faster.
bool use_streaming_stores(int64_t out_bytes) {
  return out_bytes >= kStreamMinBytes && huge_pages_enabled();
}

// Input dtype T in {float, Half, BFloat16} (the checks reject the rest), weight dtype W in {float, T}.
#define PLM_DISPATCH_NORM_TYPES(XT, WT, NAME, ...)   \
  AT_DISPATCH_V2(XT, NAME, AT_WRAP([&] {             \
                   using T = scalar_t;               \
                   if ((WT) == at::kFloat) {         \
                     using W = float;                \
                     __VA_ARGS__();                  \
                   } else {                          \
                     using W = T;                    \
                     __VA_ARGS__();                  \
                   }                                 \
                 }),                                 \
                 at::kFloat, at::kHalf, at::kBFloat16)

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                        const std::optional<Tensor>& bias,
                                                        const std::optional<Tensor>& residual, double eps,
                                                        bool is_rms) {
  check_norm_fwd_args(x, weight, bias, residual, eps);
  const int64_t rows = x.size(0), n = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor y = empty_output(x);
  Tensor h = residual.has_value() ? empty_output(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({is_rms ? 0 : rows}, f32);
  Tensor rstd = at::empty({rows}, f32);
  if (rows == 0 || n == 0) {
    if (n == 0) rstd.fill_(1.f / std::sqrt(static_cast<float>(eps))), mean.zero_();
    return {y, h, mean, rstd};
  }
  const int64_t out_bytes = y.nbytes() + h.nbytes();
  PLM_DISPATCH_NORM_TYPES(x.scalar_type(), weight.scalar_type(), "norm_fwd_cpu", [&] {
    NormFwdArgs<T, W> a{x.const_data_ptr<T>(),
                        residual ? residual->const_data_ptr<T>() : nullptr,
                        weight.const_data_ptr<W>(),
                        bias ? bias->const_data_ptr<W>() : nullptr,
                        y.mutable_data_ptr<T>(),
                        residual ? h.mutable_data_ptr<T>() : nullptr,
                        is_rms ? nullptr : mean.mutable_data_ptr<float>(),
                        rstd.mutable_data_ptr<float>(),
                        n,
                        static_cast<float>(eps),
                        is_rms,
                        use_streaming_stores(out_bytes)};
    at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) { fwd_rows(a, begin, end); });
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy, const std::optional<Tensor>& dh,
                                                const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                const Tensor& rstd, bool has_bias, bool is_rms) {
  check_norm_bwd_args(dy, dh, h, weight, mean, rstd, is_rms);
  const int64_t rows = h.size(0), n = h.size(1);
  Tensor dx = empty_output(h);
  // Rows are split into n_chunks fixed ranges; chunk c accumulates its dweight/dbias into row c of the
  // partial buffers, which are summed at the end. Fixed chunks keep the result independent of which
  // thread runs which chunk.
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  auto f32 = h.options().dtype(at::kFloat);
  Tensor dw_partial = at::zeros({n_chunks, n}, f32);
  Tensor db_partial = has_bias ? at::zeros({n_chunks, n}, f32) : Tensor();
  if (rows > 0 && n > 0) {
    PLM_DISPATCH_NORM_TYPES(h.scalar_type(), weight.scalar_type(), "norm_bwd_cpu", [&] {
      NormBwdArgs<T, W> a{dy.const_data_ptr<T>(),
                          dh ? dh->const_data_ptr<T>() : nullptr,
                          h.const_data_ptr<T>(),
                          weight.const_data_ptr<W>(),
                          is_rms ? nullptr : mean.const_data_ptr<float>(),
                          rstd.const_data_ptr<float>(),
                          dx.mutable_data_ptr<T>(),
                          n,
                          is_rms,
                          use_streaming_stores(dx.nbytes())};
      float* dwp = dw_partial.mutable_data_ptr<float>();
      float* dbp = has_bias ? db_partial.mutable_data_ptr<float>() : nullptr;
      const int64_t per_chunk = (rows + n_chunks - 1) / n_chunks;
      at::parallel_for(0, n_chunks, grain_for(per_chunk * n), [&](int64_t cbegin, int64_t cend) {
        for (int64_t c = cbegin; c < cend; ++c)
          bwd_rows(a, c * per_chunk, std::min(rows, (c + 1) * per_chunk), dwp + c * n, dbp ? dbp + c * n : nullptr);
      });
    });
  }
  Tensor dw = dw_partial.sum(0).to(weight.scalar_type());
  Tensor db = has_bias ? db_partial.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {dx, dw, db};
}

}  // namespace plm_engine
