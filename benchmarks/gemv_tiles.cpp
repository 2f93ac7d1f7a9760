// Compute rate of the decode GEMV's AVX2 tile shapes, outside the engine: one core, weights resident
// in L2 (240 rows of K = 576 or 1536), fp32 and bf16 weights (bf16 widened in registers), x in fp32.
// An MR x NR tile holds MR * NR accumulators over the whole K and keeps the smaller side's vectors in
// registers while streaming the other, as csrc/cpu/linear_kernels.inc does. Prints G lane-FMA/s (one
// core's AVX2 FMA peak: benchmarks/fma_peak.cpp). Used for benchmarks/results/NOTES.md ("Decode GEMV
// tiles on AVX2").
//
//   g++ -O3 -mavx2 -mfma -std=c++17 benchmarks/gemv_tiles.cpp -o /tmp/gemv_tiles && /tmp/gemv_tiles
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

template <typename T>
inline __m256 load8(const T* p);
template <>
inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
inline __m256 load8<uint16_t>(const uint16_t* p) {  // bf16 bits -> fp32, exact
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

template <int MR, int NR, typename T>
__attribute__((noinline)) void tile(const float* const* x, const T* const* w, long K, float* out) {
  __m256 acc[MR * NR];
  for (int i = 0; i < MR * NR; ++i) acc[i] = _mm256_setzero_ps();
  for (long k = 0; k < K; k += 8) {
    if constexpr (MR > NR) {  // NR weight vectors in registers, the x rows streamed
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) wv[n] = load8(w[n] + k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x[m] + k);
#pragma GCC unroll 8
        for (int n = 0; n < NR; ++n) acc[m * NR + n] = _mm256_fmadd_ps(xv, wv[n], acc[m * NR + n]);
      }
    } else {  // MR x vectors in registers, the weight rows streamed
      __m256 xv[MR];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x[m] + k);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) {
        const __m256 wv = load8(w[n] + k);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) acc[m * NR + n] = _mm256_fmadd_ps(xv[m], wv, acc[m * NR + n]);
      }
    }
  }
  for (int i = 0; i < MR * NR; ++i) out[i] = hsum(acc[i]);
}

// Best of 7 rounds of 200 passes of MR x NR tiles over M rows of x and N weight rows: G lane-FMA/s.
template <int MR, int NR, typename T>
double rate(const float* x, const T* w, long M, long N, long K) {
  std::vector<float> y(M * N);
  auto pass = [&] {
    for (long m0 = 0; m0 + MR <= M; m0 += MR)
      for (long n0 = 0; n0 + NR <= N; n0 += NR) {
        const float* xr[MR];
        const T* wr[NR];
        float out[MR * NR];
        for (int i = 0; i < MR; ++i) xr[i] = x + (m0 + i) * K;
        for (int j = 0; j < NR; ++j) wr[j] = w + (n0 + j) * K;
        tile<MR, NR, T>(xr, wr, K, out);
        y[m0 * N + n0] += out[0];
      }
  };
  for (int i = 0; i < 20; ++i) pass();
  double best = 1e9;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 200; ++i) pass();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 200);
  }
  return double(M / MR * MR) * double(N / NR * NR) * double(K) / best / 1e9;
}

template <typename T>
void row(const char* name, const float* x, const T* w, long N, long K) {
  std::printf("K=%-5ld %s  1x8 %5.1f | 2x4 %5.1f  2x6 %5.1f | 3x2 %5.1f  3x4 %5.1f | 4x2 %5.1f  4x3 %5.1f | 8x1 %5.1f\n",
              K, name, rate<1, 8>(x, w, 1, N, K), rate<2, 4>(x, w, 2, N, K), rate<2, 6>(x, w, 2, N, K),
              rate<3, 2>(x, w, 3, N, K), rate<3, 4>(x, w, 3, N, K), rate<4, 2>(x, w, 4, N, K),
              rate<4, 3>(x, w, 4, N, K), rate<8, 1>(x, w, 8, N, K));
}

int main() {
  std::printf("G lane-FMA/s of one core for each MR x NR tile (rows of x x weight rows)\n");
  for (long K : {576L, 1536L}) {
    const long N = 240;  // divisible by every NR above
    std::vector<float> x(8 * K, 0.01f), w(N * K, 0.02f);
    std::vector<uint16_t> wb(N * K, 0x3c00);  // bf16 0.0078125
    row("fp32", x.data(), w.data(), N, K);
    row("bf16", x.data(), wb.data(), N, K);
  }
}
