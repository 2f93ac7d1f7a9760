// y = x @ W^T (+ b) on the CPU for few rows of x: the decode-time GEMV / skinny GEMM.
//
// x (M, K), W (N, K) row-major (nn.Linear's layout), b (N,) or none; y (M, N) in x's dtype, fp32 math.
// At decode M is 1..32 and the time is spent reading W, so the kernel reads W exactly once per call:
//  - N is cut into blocks of kBlockN = 16 weight rows; OpenMP (at::parallel_for, static contiguous
//    ranges) spreads whole blocks over the threads.
//  - Within a block, every tile of MR rows of x is multiplied by the block, NR weight rows at a time
//    (MR * NR = 16 accumulators). The first tile pulls the block from memory, the others find it in
//    L1/L2; x (at most a few hundred KB) stays in L2 for the whole call. For rows of up to 4 KB, the
//    tiles of a block also prefetch the next block's weights (Prefetch).
//  - A tile's 16 accumulators are 16-lane partial dot products; one fixed transposing tree (reduce16)
//    turns them into the 16 outputs. Missing weight rows in the last block are padded with a repeated
//    row and their outputs dropped, so every output sees the same K loop and the same reduction tree
//    whatever M, the thread count, or where a thread's range starts: results are bitwise independent of
//    the thread count and of the other rows in the batch.
// Instruction sets, chosen once at run time (linear_isa()):
//   avx512_bf16  bf16 weights: VDPBF16PS on bf16 pairs of x and W (x is already bf16); products are exact
//                in fp32, but the instruction reads bf16 denormals (|v| < 1.2e-38) as 0
//   avx512       fp32: FMA; fp16 and bf16 (without the BF16 extension): W widened to fp32 in registers
//                (bf16 by a 16-bit shift), x widened once per call into an fp32 scratch copy
//   generic      plain fp32 loops (no AVX-512, or PLM_ENGINE_CPU_ISA=generic|avx2): correct, not fast;
//                plm_engine.ops.linear then keeps to F.linear unless asked for this backend explicitly.
// PLM_ENGINE_CPU_ISA=avx512 caps the choice below the BF16 extension (to test that path here).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#include "cpu/simd512.h"

namespace plm_engine {

using at::Tensor;

namespace {

constexpr int64_t kBlockN = 16;  // weight rows per block: a multiple of every tile's NR

enum class LinearIsa { kGeneric = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

LinearIsa detect_linear_isa() {
  if (!cpu::avx512_enabled()) return LinearIsa::kGeneric;  // also honours PLM_ENGINE_CPU_ISA=generic|avx2
#ifdef PLM_CPU_AVX512
  bool bf16 = __builtin_cpu_supports("avx512bf16");
  if (const char* env = std::getenv("PLM_ENGINE_CPU_ISA")) {
    if (std::string(env) == "avx512") bf16 = false;
  }
  return bf16 ? LinearIsa::kAvx512Bf16 : LinearIsa::kAvx512;
#else
  return LinearIsa::kGeneric;
#endif
}

LinearIsa linear_isa() {
  static const LinearIsa isa = detect_linear_isa();
  return isa;
}

// Row r of a row-major matrix. The tile kernels take row pointers, so a padded tile can repeat a
// weight row without copying.
template <typename T>
struct Rows {
  const T* p;
  int64_t stride;
  const T* operator[](int64_t r) const { return p + r * stride; }
};

// ---- generic build -----------------------------------------------------------------------------------

template <typename T>
void linear_rows_generic(const T* x, const T* w, const float* bias, T* y, int64_t M, int64_t N, int64_t K,
                         int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const T* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * K;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(xr[k]) * static_cast<float>(wr[k]);
      y[m * N + n] = static_cast<T>(s + (bias != nullptr ? bias[n] : 0.f));
    }
  }
}

}  // namespace
}  // namespace plm_engine

// ---- AVX-512 build ---------------------------------------------------------------------------------

#ifdef PLM_CPU_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace plm_engine {
namespace {
namespace avx512 {

// One level of the transposing reduction: from a and b, each holding groups of 2h partial sums, the
// vector whose groups of h partial sums are the pairwise sums (a's groups first, then b's).
struct alignas(64) FoldIndex {
  int32_t lo[16], hi[16];
};

template <int H>
constexpr FoldIndex fold_index() {
  FoldIndex t{};
  for (int l = 0; l < 16; ++l) {
    const int g = l / H, e = l % H, half = 8 / H;  // output group g of H sums; a's groups come first
    const int src = g < half ? g * 2 * H + e : 16 + (g - half) * 2 * H + e;
    t.lo[l] = src;
    t.hi[l] = src + H;
  }
  return t;
}

// One level of the transposing reduction: a and b hold groups of 2H partial sums (one group per
// output); the result holds groups of H, each the sum of a group's two halves, a's groups first.
template <int H>
inline __m512 fold(__m512 a, __m512 b) {
  static constexpr FoldIndex idx = fold_index<H>();
  const __m512i lo = _mm512_load_si512(idx.lo), hi = _mm512_load_si512(idx.hi);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
}

// Lane i of the result = the sum of the 16 lanes of v[i], by one fixed tree for every i.
inline __m512 reduce16(__m512 (&v)[16]) {
  __m512 u[8], w[4], z[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) u[i] = fold<8>(v[2 * i], v[2 * i + 1]);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) w[i] = fold<4>(u[2 * i], u[2 * i + 1]);
  z[0] = fold<2>(w[0], w[1]);
  z[1] = fold<2>(w[2], w[3]);
  return fold<1>(z[0], z[1]);
}

// Software prefetch into L2 of the next block's weights (its kBlockN rows are one contiguous region),
// spread evenly over every K step of every tile of the current block, so the memory stays busy while
// the later row tiles compute from cache. Short rows defeat the hardware prefetcher: every tile starts
// NR new streams of a few cache lines each (measured, one thread, bf16 576 x 49152, M = 1: 12 -> 19-27
// GB/s). A null cursor (p == end) prefetches nothing.
struct Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t lines = 0;  // cache lines per K step
  inline void step() {
    for (int64_t i = 0; i < lines && p < end; ++i, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

// 16 weights widened to fp32.
inline __m512 load_w(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_w(const c10::BFloat16* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
inline __m512 load_w(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load_w(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load_w(const c10::BFloat16* p, __mmask16 k) {
  const __m256i b = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
inline __m512 load_w(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

// The MR x NR tile over the whole K: fp32 x rows, weights of type T widened in registers, FMA.
// Lane m * NR + n of the result = dot(x[m], w[n]).
template <int MR, int NR, typename T>
inline __m512 tile_fma(const float* const* x, const T* const* w, int64_t K, Prefetch& pf) {
  static_assert(MR * NR <= 16, "one tile holds at most 16 accumulators");
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    pf.step();
    __m512 xv[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(x[m] + k);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const __m512 wv = load_w(w[n] + k);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[m * NR + n] = _mm512_fmadd_ps(xv[m], wv, acc[m * NR + n]);
    }
  }
  if (k < K) {  // masked tail: the lanes past K read as 0 and add nothing
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 xv[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x[m] + k);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const __m512 wv = load_w(w[n] + k, mask);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[m * NR + n] = _mm512_fmadd_ps(xv[m], wv, acc[m * NR + n]);
    }
  }
  return reduce16(acc);
}

// The same tile for bf16 x and W with VDPBF16PS: each fp32 lane accumulates the exact products of one
// bf16 pair per 32 elements of K.
template <int MR, int NR>
inline __m512 tile_dpbf16(const c10::BFloat16* const* x, const c10::BFloat16* const* w, int64_t K,
                          Prefetch& pf) {
  static_assert(MR * NR <= 16, "one tile holds at most 16 accumulators");
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    pf.step();
    __m512bh xv[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x[m] + k);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w[n] + k);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[m * NR + n] = _mm512_dpbf16_ps(acc[m * NR + n], xv[m], wv);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1ull);
    __m512bh xv[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x[m] + k);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[n] + k);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[m * NR + n] = _mm512_dpbf16_ps(acc[m * NR + n], xv[m], wv);
    }
  }
  return reduce16(acc);
}

// The tile kernel for (x type XT, weight type T): dpbf16 when asked, else FMA on fp32 x.
template <bool kDp, int MR, int NR, typename XT, typename T>
inline __m512 tile(const XT* const* x, const T* const* w, int64_t K, Prefetch& pf) {
  if constexpr (kDp) {
    return tile_dpbf16<MR, NR>(x, w, K, pf);
  } else {
    return tile_fma<MR, NR, T>(x, w, K, pf);
  }
}

// Rows [m0, m0 + MR) of x against weight rows [n0, n0 + nb) (nb <= kBlockN), NR rows at a time.
// Lanes [0, k) of v, rounded to T (bf16 as c10 rounds, fp16 by VCVTPS2PH), stored at p.
inline void store_first(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void store_first(c10::BFloat16* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, cpu::v512::to_bf16(v));
}
inline void store_first(c10::Half* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Rows [m0, m0 + MR) of x against weight rows [n0, n0 + nb) (nb <= kBlockN), NR rows at a time. Each
// tile's 16 sums (lane m * NR + n) get the bias in fp32, are rounded once to T and stored row by row.
template <bool kDp, int MR, typename XT, typename T>
inline void block_tiles(Rows<XT> x, const T* w, int64_t K, int64_t m0, int64_t n0, int64_t nb,
                        const float* bias, T* y, int64_t ldy, Prefetch& pf) {
  constexpr int NR = MR == 1 ? 16 : MR == 2 ? 8 : 4;  // at most 16 accumulators
  const XT* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = x[m0 + m];
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i bias_idx = _mm512_and_si512(lane, _mm512_set1_epi32(NR - 1));  // lane i -> bias[i % NR]
  for (int64_t j = 0; j < nb; j += NR) {
    const int64_t valid = std::min<int64_t>(NR, nb - j);
    const __mmask16 keep = cpu::v512::first(valid);
    const T* wr[NR];
    for (int n = 0; n < NR; ++n) wr[n] = w + (n0 + j + std::min<int64_t>(n, valid - 1)) * K;  // pad: repeat
    __m512 v = tile<kDp, MR, NR>(xr, wr, K, pf);
    if (bias != nullptr)
      v = _mm512_add_ps(v, _mm512_permutexvar_ps(bias_idx, _mm512_maskz_loadu_ps(keep, bias + n0 + j)));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512 row = m == 0 ? v : _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(m * NR)), v);
      store_first(y + (m0 + m) * ldy + n0 + j, row, keep);
    }
  }
}

// Weight blocks [b_begin, b_end) of kBlockN rows, all M rows of x.
template <bool kDp, typename XT, typename T>
void linear_blocks(Rows<XT> x, const T* w, const float* bias, T* y, int64_t M, int64_t N, int64_t K,
                   int64_t b_begin, int64_t b_end) {
  // Rows longer than 4 KB are long enough streams for the hardware prefetcher; software prefetch of
  // them measured slower (fp32 1536 x 16384: 19-25 -> 17-21 GB/s).
  const bool prefetch = K * static_cast<int64_t>(sizeof(T)) <= 4096;
  // K steps per block: every row tile (MR rows, NR = 16 / MR rounded to 4, 8, 16) runs nb / NR tiles.
  constexpr int64_t kStep = kDp ? 32 : 16;
  const int64_t k_steps = (K + kStep - 1) / kStep;
  const int64_t r = M % 4;
  const int64_t tiles = (M / 4) * (kBlockN / 4) + (r == 3 ? 4 : r == 2 ? 2 : r == 1 ? 1 : 0);
  const int64_t block_lines = (kBlockN * K * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  const int64_t steps = std::max<int64_t>(1, tiles * k_steps);  // K = 0: no steps, nothing to prefetch
  const int64_t lines_per_step = std::max<int64_t>(1, (block_lines + steps - 1) / steps);
  const char* const w_end = reinterpret_cast<const char*>(w + N * K);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t n0 = b * kBlockN, nb = std::min(kBlockN, N - n0);
    Prefetch pf;
    if (prefetch && n0 + kBlockN < N) {
      pf.p = reinterpret_cast<const char*>(w + (n0 + kBlockN) * K);
      pf.end = std::min(w_end, pf.p + kBlockN * K * static_cast<int64_t>(sizeof(T)));
      pf.lines = lines_per_step;
    }
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) block_tiles<kDp, 4>(x, w, K, m0, n0, nb, bias, y, N, pf);
    switch (M - m0) {
      case 3: block_tiles<kDp, 3>(x, w, K, m0, n0, nb, bias, y, N, pf); break;
      case 2: block_tiles<kDp, 2>(x, w, K, m0, n0, nb, bias, y, N, pf); break;
      case 1: block_tiles<kDp, 1>(x, w, K, m0, n0, nb, bias, y, N, pf); break;
      default: break;
    }
  }
}

}  // namespace avx512
}  // namespace
}  // namespace plm_engine
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_CPU_AVX512

namespace plm_engine {

std::string linear_cpu_isa() {
  switch (linear_isa()) {
    case LinearIsa::kAvx512Bf16: return "avx512_bf16";
    case LinearIsa::kAvx512: return "avx512";
    default: return "generic";
  }
}

namespace {

// Blocks per thread chunk: at least ~64K weight elements, so a small layer is not split across threads
// (a fork/join costs a few microseconds, as much as reading ~100 KB).
int64_t grain_blocks(int64_t K, int64_t M) {
  const int64_t per_block = kBlockN * std::max<int64_t>(K, 1) * std::max<int64_t>(M, 1);
  return std::max<int64_t>(1, (int64_t{1} << 16) / per_block);
}

template <typename T>
void linear_kernel(const Tensor& x, const Tensor& w, const float* bias, Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t n_blocks = (N + kBlockN - 1) / kBlockN;
  const LinearIsa isa = linear_isa();
#ifdef PLM_CPU_AVX512
  if (isa != LinearIsa::kGeneric) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (isa == LinearIsa::kAvx512Bf16) {
        const Rows<T> xr{xp, K};
        at::parallel_for(0, n_blocks, grain_blocks(K, M), [&](int64_t b0, int64_t b1) {
          avx512::linear_blocks<true>(xr, wp, bias, yp, M, N, K, b0, b1);
        });
        return;
      }
    }
    // fp32 x for the FMA tiles: x itself, or one widened copy (M * K, read from L2 per weight block).
    Tensor xf = std::is_same_v<T, float> ? x : x.to(at::kFloat);
    const Rows<float> xr{xf.data_ptr<float>(), K};
    at::parallel_for(0, n_blocks, grain_blocks(K, M), [&](int64_t b0, int64_t b1) {
      avx512::linear_blocks<false>(xr, wp, bias, yp, M, N, K, b0, b1);
    });
    return;
  }
#endif
  at::parallel_for(0, n_blocks, grain_blocks(K, M), [&](int64_t b0, int64_t b1) {
    linear_rows_generic(xp, wp, bias, yp, M, N, K, b0 * kBlockN, std::min(N, b1 * kBlockN));
  });
}

}  // namespace

// Argument checks are in linear_ops.cpp (check_linear_args); x and weight arrive 2-D with one dtype.
Tensor linear_fwd_cpu_impl(const Tensor& x_in, const Tensor& w_in, const std::optional<Tensor>& bias_in) {
  // The kernel reads rows with a unit stride: a strided x is copied once (small at decode); a strided
  // weight too (a full copy: plm_engine.ops.linear sends those to F.linear instead).
  const Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), N = w.size(0);
  Tensor y = at::empty({M, N}, x.options());
  // The bias in fp32 (N floats): added before the one rounding of each output.
  Tensor bias_f;
  if (bias_in.has_value()) bias_f = bias_in->to(at::kFloat).contiguous();
  const float* bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  if (M == 0 || N == 0) return y;
  AT_DISPATCH_SWITCH(x.scalar_type(), "linear_fwd_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] { linear_kernel<scalar_t>(x, w, bias, y); })
                         AT_DISPATCH_CASE(at::kBFloat16, [&] { linear_kernel<scalar_t>(x, w, bias, y); })
                             AT_DISPATCH_CASE(at::kHalf, [&] { linear_kernel<scalar_t>(x, w, bias, y); }));
  return y;
}

}  // namespace plm_engine
