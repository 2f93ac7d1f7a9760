// y = x @ W^T (+ b) on the CPU for few rows of x: the decode-time GEMV / skinny GEMM.
//
// x (M, K), W (N, K) row-major (nn.Linear's layout), b (N,) or none; y (M, N) in x's dtype, fp32 math.
// At decode M is 1..32 and the time is spent reading W, so the kernel reads W exactly once per call:
//  - N is cut into blocks of kBlockN = 16 weight rows; OpenMP (at::parallel_for, static contiguous
//    ranges) spreads whole blocks over the threads.
//  - Within a block, every tile of MR rows of x (M <= 4: one tile of M; 16-bit weights and 5..8 rows
//    on the 32-register builds: one tile of 8, the rows past M repeating row M - 1; otherwise tiles of
//    4, then 1..3) is multiplied by the block, NR weight rows at a time (MR * NR accumulators: up to
//    12 on AVX2's 16 registers, 16 on AVX-512's and NEON's 32; linear_kernels.inc). The first tile
//    pulls the block from memory, the others find it in L1/L2; x (at most a few hundred KB) stays in
//    L2 for the whole call. The tiles of a block also prefetch the next block's weights (Prefetch;
//    for rows over 4 KB only from M = 2, where the hardware prefetcher alone falls behind).
//  - Every output is a Vec::W-lane FMA dot product in a fixed K order reduced by one fixed tree
//    (linear_kernels.inc). Missing weight rows in the last block are padded with a repeated row and
//    their outputs dropped, so every output sees the same K loop and the same reduction whatever M, the
//    thread count, or where a thread's range starts: results are bitwise independent of the thread
//    count and of the other rows in the batch (for a given instruction set).
// Instruction sets (cpu::cpu_isa(), followed at every call, so set_cpu_isa() switches it at run time):
//   generic / avx2 / avx512   the portable kernel of linear_kernels.inc, one build per vector policy:
//                fp32 x (bf16/fp16 x widened once per call into an fp32 scratch copy), W of the input
//                dtype widened to fp32 in registers (or, when several row tiles read a block, once
//                per block into a per-thread fp32 scratch), FMA
//   avx512_bf16  bf16 weights: VDPBF16PS on bf16 pairs of x and W (x is already bf16); products are exact
//                in fp32, but the instruction reads bf16 denormals (|v| < 1.2e-38) as 0. fp32 and fp16
//                run the avx512 build.
// The generic build is correct, not fast: plm_engine.ops.linear keeps to F.linear there unless asked
// for this backend explicitly.
//
// linear_q_fwd (weights in GGUF blocks) has two paths:
//   exact  every block type: 16 weight rows at a time decoded into fp32 scratch, then the fp32 tiles
//          above: y equals linear_fwd on the dequantized weight, bit for bit. Used for many rows (a
//          prefill: the fp32 tiles reuse each decoded block for every row), for Q4_K / Q6_K, and
//          whenever PLM_ENGINE_LINEAR_Q=exact.
//   int8   Q8_0 / Q4_0 / Q4_1 at up to q8_max_rows() rows (a decode step), or whenever
//          PLM_ENGINE_LINEAR_Q=int8: x quantized per block of 32 to int8 with an fp32 scale (and its
//          scaled sum for the Q4 types' offsets), once per call, then integer dot products per block
//          (linear_q8.inc), as llama.cpp does. Builds: avx512 + AVX512-VNNI (VPDPBUSD on 256-bit
//          vectors), avx512 without VNNI and avx2 (VPMADDUBSW + VPMADDWD), avx2 + AVX-VNNI (VPDPBUSD,
//          VEX), generic (integer loops). A 512-bit variant (two blocks per vector) measured slower
//          here: building its per-lane scale vectors costs more shuffles than the wider dot saves.
//          y differs from the exact path by x's quantization (|x - x~| <= amax / 254 per block).
//          Results are bitwise independent of the thread count and of the other rows, per build.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/register.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "linear.h"

namespace plm_engine {

using at::Tensor;

namespace {

constexpr int64_t kBlockN = 16;  // weight rows per block: a multiple of every tile's NR
constexpr int kTileRows = 4;     // rows of x per tile; the last 1..3 rows of x take a smaller tile
constexpr int kWideTileRows = 8; // 16-bit W, 5..8 rows of x: one tile of 8 (rows past M repeat the last)

// Software prefetch into L2 of the next block's weights (its kBlockN rows are one contiguous region),
// spread evenly over every K step of every tile of the current block, so the memory stays busy while
// the later row tiles compute from cache. Short rows defeat the hardware prefetcher: every tile starts
// NR new streams of a few cache lines each. A null cursor (p == end) prefetches nothing.
struct Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t rate = 0;  // cache lines per K step, in 1/65536 (a block's lines need not divide its steps)
  int64_t due = 0;   // lines owed so far, in 1/65536
  inline void step() {
    for (due += rate; due >= 65536 && p < end; due -= 65536, p += 64) __builtin_prefetch(p, 0, 2);
  }
};

// The Prefetch of each block of one call: `steps` K steps per block (all its tiles together), M rows
// of x.
template <typename T>
struct Prefetcher {
  const char* w;
  const char* w_end;
  int64_t block_bytes, rate;
  bool on;
  Prefetcher(const T* w_, int64_t N, int64_t K, int64_t steps, int64_t M)
      : w(reinterpret_cast<const char*>(w_)),
        w_end(reinterpret_cast<const char*>(w_ + N * K)),
        block_bytes(kBlockN * K * static_cast<int64_t>(sizeof(T))),
        // Rows longer than 4 KB are long enough streams for the hardware prefetcher while a block's
        // compute is light (M = 1: software prefetch measured 2-4% slower there); from M = 2 the block
        // computes long enough that it falls behind (software prefetch measured 3-20% faster).
        on(M >= 2 || K * static_cast<int64_t>(sizeof(T)) <= 4096) {
    // Every line of the next block exactly once over the current block's steps: prefetching only part
    // of it, or all of it in the first part of the steps, measured slower.
    const int64_t s = std::max<int64_t>(steps, 1);
    rate = ((block_bytes + 63) / 64 * 65536 + s - 1) / s;
  }
  Prefetch next_block(int64_t n0) const {
    Prefetch pf;
    const char* p = w + (n0 / kBlockN + 1) * block_bytes;
    if (on && p < w_end) {
      pf.p = p;
      pf.end = std::min(w_end, p + block_bytes);
      pf.rate = rate;
    }
    return pf;
  }
};

// The portable kernels: generic::, avx2:: and avx512::linear_blocks<T>.
#define PLM_SIMD_KERNELS "cpu/linear_kernels.inc"
#include "cpu/simd_instantiate.inc"

}  // namespace
}  // namespace plm_engine

// ---- AVX512_BF16 extra: VDPBF16PS for bf16 x and W -------------------------------------------------

#ifdef PLM_SIMD_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace plm_engine {
namespace {
namespace avx512bf16 {

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

// Rows [m0, m0 + MR) of x against weight rows [n0, n0 + nb) (nb <= kBlockN), NR = 16 / MR rows at a
// time (16 accumulators); a partial last tile repeats its last weight row and drops those outputs.
template <int MR>
inline void block_tiles(const c10::BFloat16* x, const c10::BFloat16* w, int64_t K, int64_t m0, int64_t n0,
                        int64_t nb, const float* bias, c10::BFloat16* y, int64_t ldy, Prefetch& pf) {
  constexpr int NR = MR == 1 ? 16 : MR == 2 ? 8 : 4;
  const c10::BFloat16* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = x + (m0 + m) * K;
  for (int64_t j = 0; j < nb; j += NR) {
    const int64_t valid = std::min<int64_t>(NR, nb - j);
    const c10::BFloat16* wr[NR];
    for (int n = 0; n < NR; ++n) wr[n] = w + (n0 + j + std::min<int64_t>(n, valid - 1)) * K;
    alignas(64) float out[16];
    _mm512_store_ps(out, tile_dpbf16<MR, NR>(xr, wr, K, pf));
    for (int m = 0; m < MR; ++m) {
      c10::BFloat16* yr = y + (m0 + m) * ldy + n0 + j;
      for (int64_t n = 0; n < valid; ++n)
        yr[n] = cpu::simd::from_f<c10::BFloat16>(out[m * NR + n] + (bias != nullptr ? bias[n0 + j + n] : 0.f));
    }
  }
}

// Weight blocks [b_begin, b_end) of kBlockN rows, all M rows of x.
void linear_blocks(const c10::BFloat16* x, const c10::BFloat16* w, const float* bias, c10::BFloat16* y,
                   int64_t M, int64_t N, int64_t K, int64_t b_begin, int64_t b_end) {
  const int64_t r = M % 4;
  const int64_t tiles = (M / 4) * (kBlockN / 4) + (r == 3 ? 4 : r == 2 ? 2 : r == 1 ? 1 : 0);
  const Prefetcher pfr(w, N, K, tiles * ((K + 31) / 32), M);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t n0 = b * kBlockN, nb = std::min(kBlockN, N - n0);
    Prefetch pf = pfr.next_block(n0);
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) block_tiles<4>(x, w, K, m0, n0, nb, bias, y, N, pf);
    switch (M - m0) {
      case 3: block_tiles<3>(x, w, K, m0, n0, nb, bias, y, N, pf); break;
      case 2: block_tiles<2>(x, w, K, m0, n0, nb, bias, y, N, pf); break;
      case 1: block_tiles<1>(x, w, K, m0, n0, nb, bias, y, N, pf); break;
      default: break;
    }
  }
}

}  // namespace avx512bf16
}  // namespace
}  // namespace plm_engine
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_SIMD_X86

// ---- VNNI extras of the int8 path: the same linear_q8.inc with VPDPBUSD -----------------------------

#ifdef PLM_SIMD_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace plm_engine {
namespace {
namespace avx512vnni {
using Vec = ::plm_engine::cpu::simd::Avx512;
#define PLM_Q8_VNNI 512
#include "cpu/linear_q8.inc"
#undef PLM_Q8_VNNI
}  // namespace avx512vnni
}  // namespace
}  // namespace plm_engine
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace plm_engine {
namespace {
namespace avx2vnni {
using Vec = ::plm_engine::cpu::simd::Avx2;
#define PLM_Q8_VNNI 256
#include "cpu/linear_q8.inc"
#undef PLM_Q8_VNNI
}  // namespace avx2vnni
}  // namespace
}  // namespace plm_engine
#pragma GCC pop_options
#endif  // PLM_SIMD_X86

namespace plm_engine {

std::string linear_cpu_isa() { return cpu::isa_name(cpu::cpu_isa()); }

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
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t n_blocks = (N + kBlockN - 1) / kBlockN;
#ifdef PLM_SIMD_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu::cpu_isa() == cpu::Isa::kAvx512Bf16) {
      const T* xp = x.data_ptr<T>();
      at::parallel_for(0, n_blocks, grain_blocks(K, M), [&](int64_t b0, int64_t b1) {
        avx512bf16::linear_blocks(xp, wp, bias, yp, M, N, K, b0, b1);
      });
      return;
    }
  }
#endif
  // fp32 x for the FMA tiles: x itself, or one widened copy (M * K, read from L2 per weight block).
  const Tensor xf = std::is_same_v<T, float> ? x : x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  // More than one row tile per block (M > 8): 16-bit weights are widened once per block into this
  // thread's fp32 scratch (linear_blocks), not converted again by every tile. Up to 8 rows, the one
  // tile widens each weight vector in registers and uses it for all rows.
  const bool widen = !std::is_same_v<T, float> && M > kWideTileRows;
  at::parallel_for(0, n_blocks, grain_blocks(K, M), [&](int64_t b0, int64_t b1) {
    std::vector<float> wide(widen ? kBlockN * K : 0);
    PLM_CPU_CALL(linear_blocks<T>, xp, wp, bias, yp, M, N, K, b0, b1, widen ? wide.data() : nullptr);
  });
}

Tensor cpu_linear_fwd(const Tensor& x_in, const Tensor& w_in, const std::optional<Tensor>& bias_in) {
  check_linear_args(x_in, w_in, bias_in);
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
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "linear_fwd_cpu", [&] { linear_kernel<scalar_t>(x, w, bias, y); });
  return y;
}

// The int8 path's builds (linear_q8.inc): which one runs for the current ISA cap and this CPU.
enum class Q8Path { kGeneric, kAvx2, kAvx2Vnni, kAvx512, kAvx512Vnni };

Q8Path q8_path() {
#ifdef PLM_SIMD_X86
  static const bool vnni512 = __builtin_cpu_supports("avx512vnni");
  static const bool vnni256 = __builtin_cpu_supports("avxvnni");
  switch (cpu::build_for(cpu::cpu_isa())) {
    case cpu::Isa::kAvx512: return vnni512 ? Q8Path::kAvx512Vnni : Q8Path::kAvx512;
    case cpu::Isa::kAvx2: return vnni256 ? Q8Path::kAvx2Vnni : Q8Path::kAvx2;
    default: return Q8Path::kGeneric;
  }
#else
  return Q8Path::kGeneric;
#endif
}

// Rows of x up to which linear_q_fwd takes the int8 path (Q8_0 / Q4_0 / Q4_1 weights), per path;
// more rows take the exact path. Measured on a 2-core Xeon (AVX-512 + VNNI + AVX-VNNI), one thread,
// Q4_1 1536 x 576 and 576 x 1536 and Q8_0 49152 x 576 (int8 / exact time): the int8 path costs about
// 2.3 cycles per row of x, weight row and block of 32, the exact path's decode amortises over rows.
//   avx512 + VNNI:     M = 1: 0.37-0.51, M = 4: 0.69-0.89, M = 8: 1.08-1.20   -> 4
//   avx512, no VNNI:   M = 1: 0.40-0.57, M = 4: 0.75-1.12, M = 8: 1.05-1.51   -> 2
//   avx2 + AVX-VNNI:   M = 1: 0.38-0.44, M = 8: 0.60-0.76, M = 16: 0.74-0.92 -> 16
//   avx2, no VNNI:     M = 1: 0.41-0.49, M = 8: 0.72-0.93, M = 16: 0.85-1.03 -> 8
//   generic:           M = 1..4: 0.09-0.26                                    -> 16
// (the builds without VNNI measured on the same CPU with VNNI detection switched off).
// Never more than 16 rows: the native decode step's quantized embedding lookup multiplies an identity
// of hidden-size rows (>= 32) and needs the exact path's exact products.
int64_t q8_max_rows(Q8Path p) {
  switch (p) {
    case Q8Path::kAvx512Vnni: return 4;
    case Q8Path::kAvx512: return 2;
    case Q8Path::kAvx2Vnni: return 16;
    case Q8Path::kAvx2: return 8;
    default: return 16;
  }
}

// PLM_ENGINE_LINEAR_Q=exact | int8 | auto (unset: auto) overrides the choice by rows: exact keeps
// every call on the exact path, int8 sends every Q8_0 / Q4_0 / Q4_1 call to the int8 path. Read at each
// call, so tests and users can switch it at run time (getenv: well under a microsecond against a
// layer's tens).
enum class Q8Mode { kAuto, kExact, kInt8 };

Q8Mode q8_mode() {
  const char* v = std::getenv("PLM_ENGINE_LINEAR_Q");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return Q8Mode::kAuto;
  if (std::strcmp(v, "exact") == 0) return Q8Mode::kExact;
  if (std::strcmp(v, "int8") == 0) return Q8Mode::kInt8;
  TORCH_CHECK(false, "PLM_ENGINE_LINEAR_Q must be exact, int8 or auto, got '", v, "'");
}

template <typename T>
void linear_q8(const Tensor& x_in, const uint8_t* qp, int64_t qtype, int64_t row_bytes, const float* bias, T* yp,
               int64_t M, int64_t N, int64_t K, Q8Path path) {
  const Tensor xf = x_in.to(at::kFloat).contiguous();
  // Quantized x: M * K int8, then the fp32 scales and sums of its M * K / 32 blocks.
  const int64_t nb = K / 32;
  thread_local std::vector<uint8_t> scratch;
  const size_t need = static_cast<size_t>(M * K + 2 * M * nb * static_cast<int64_t>(sizeof(float)) + 64);
  if (scratch.size() < need) scratch.resize(need);
  int8_t* xq = reinterpret_cast<int8_t*>(scratch.data());
  float* xd = reinterpret_cast<float*>(scratch.data() + ((M * K + 63) / 64) * 64);
  float* xs = xd + M * nb;
  const float* xp = xf.data_ptr<float>();
  const int64_t n_blocks = (N + kBlockN - 1) / kBlockN;
  const int64_t grain = grain_blocks(K / 4, M);  // a weight block is ~4x smaller than in fp32
#define PLM_Q8_RUN(ns)                                                                                 \
  do {                                                                                                 \
    ns::quantize_rows(xp, M, K, xq, xd, xs);                                                           \
    const ns::Q8Rows rows{xq, xd, xs, K};                                                              \
    at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {                                 \
      ns::linear_q8_blocks<T>(rows, qp, qtype, row_bytes, bias, yp, M, N, b0, b1);                     \
    });                                                                                                \
  } while (0)
  switch (path) {
#ifdef PLM_SIMD_X86
    case Q8Path::kAvx512Vnni: PLM_Q8_RUN(avx512vnni); break;
    case Q8Path::kAvx512: PLM_Q8_RUN(avx512); break;
    case Q8Path::kAvx2Vnni: PLM_Q8_RUN(avx2vnni); break;
    case Q8Path::kAvx2: PLM_Q8_RUN(avx2); break;
#endif
    default: PLM_Q8_RUN(generic); break;
  }
#undef PLM_Q8_RUN
}

Tensor cpu_linear_q_fwd(const Tensor& x_in, const Tensor& q_in, int64_t qtype, const std::optional<Tensor>& bias_in) {
  check_linear_q_args(x_in, q_in, qtype, bias_in);
  if ((qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1) && x_in.size(0) > 0 && q_in.size(0) > 0) {
    const Q8Path path = q8_path();
    const Q8Mode mode = q8_mode();
    if (mode == Q8Mode::kInt8 || (mode == Q8Mode::kAuto && x_in.size(0) <= q8_max_rows(path))) {
      const Tensor q = q_in.contiguous();
      const int64_t M = x_in.size(0), K = x_in.size(1), N = q.size(0);
      Tensor y = at::empty({M, N}, x_in.options());
      Tensor bias_f;
      if (bias_in.has_value()) bias_f = bias_in->to(at::kFloat).contiguous();
      const float* bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
      PLM_DISPATCH_FLOAT_TYPES(y.scalar_type(), "linear_q8_cpu", [&] {
        linear_q8<scalar_t>(x_in, q.data_ptr<uint8_t>(), qtype, q.size(1), bias, y.data_ptr<scalar_t>(), M, N, K, path);
      });
      return y;
    }
  }
  const Tensor xf = x_in.to(at::kFloat).contiguous(), q = q_in.contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = q.size(0), row_bytes = q.size(1);
  Tensor y = at::empty({M, N}, x_in.options());
  Tensor bias_f;
  if (bias_in.has_value()) bias_f = bias_in->to(at::kFloat).contiguous();
  const float* bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  if (M == 0 || N == 0) return y;
  const float* xp = xf.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int64_t n_blocks = (N + kBlockN - 1) / kBlockN;
  PLM_DISPATCH_FLOAT_TYPES(y.scalar_type(), "linear_q_fwd_cpu", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n_blocks, grain_blocks(K, M), [&](int64_t b0, int64_t b1) {
      std::vector<float> wide(kBlockN * K);  // one block of decoded weights, reused block after block
      PLM_CPU_CALL(linear_q_blocks<scalar_t>, xp, qp, qtype, row_bytes, bias, yp, M, N, K, b0, b1, wide.data());
    });
  });
  return y;
}

}  // namespace
}  // namespace plm_engine

PLM_REGISTER_KERNELS(CPU, cpu, linear_fwd, linear_q_fwd)
