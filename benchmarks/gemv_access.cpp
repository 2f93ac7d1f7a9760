// The memory access of the CPU decode GEMV, outside the engine: one SmolLM2-135M decode step's linear
// layers (30 x (qkv, o, gate_up, down) + LM head, fp32, 538 MB, each with its own weights) at M = 1,
// AVX2 + FMA, split over the OpenMP threads as csrc/cpu/linear.cpp splits them (contiguous blocks of 16
// weight rows). Variants, GB/s of weights read, interleaved rounds: the kernel's pattern (8-row tiles,
// software prefetch of the next block into L2), without prefetch, other prefetch distances and hints,
// one row at a time, and a plain read of the same layers (the ceiling for this structure). Used for
// benchmarks/results/NOTES.md ("The CPU suite at 2 threads").
//
//   g++ -O3 -mavx2 -mfma -fopenmp benchmarks/gemv_access.cpp -o /tmp/gemv_access && /tmp/gemv_access
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
struct Layer { int N, K; float* w; };
static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
// variant: 0 = plain 8-row tiles; 1 = + next-block prefetch T1 spread (ours); 2 = distance 2 blocks;
// 3 = T0 hint; 4 = NTA hint; 5 = pure sum (read only); 6 = row-at-a-time 4 accumulators + prefetch
template <int V>
void layer(const Layer& L, const float* x, float* y, int b0, int b1) {
  const int K = L.K;
  const long block = 16L * K;
  for (int b = b0; b < b1; ++b) {
    const float* wb = L.w + b * block;
    const char* pf = reinterpret_cast<const char*>(wb + (V == 2 ? 2 : 1) * block);
    const char* pend = reinterpret_cast<const char*>(L.w + (long)L.N * K);
    const long lines = block * 4 / 64, steps = 2L * K / 8;
    const long lps = (lines + steps - 1) / steps;
    if (V == 5) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (long i = 0; i < block; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(wb + i)); a1 = _mm256_add_ps(a1, _mm256_loadu_ps(wb + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(wb + i + 16)); a3 = _mm256_add_ps(a3, _mm256_loadu_ps(wb + i + 24));
      }
      y[b] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      continue;
    }
    if (V == 6) {
      for (int r = 0; r < 16; ++r) {
        const float* w = wb + (long)r * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k += 32) {
          for (int i = 0; i < 2 && pf < pend; ++i, pf += 64) __builtin_prefetch(pf, 0, 2);
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(w + k + 8), a1);
          a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_loadu_ps(w + k + 16), a2);
          a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_loadu_ps(w + k + 24), a3);
        }
        y[b * 16 + r] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      }
      continue;
    }
    for (int t = 0; t < 2; ++t) {
      const float* w = wb + (long)t * 8 * K;
      __m256 acc[8];
      for (int n = 0; n < 8; ++n) acc[n] = _mm256_setzero_ps();
      for (int k = 0; k < K; k += 8) {
        if (V != 0)
          for (long i = 0; i < lps && pf < pend; ++i, pf += 64) {
            if (V == 3) __builtin_prefetch(pf, 0, 3); else if (V == 4) __builtin_prefetch(pf, 0, 0); else __builtin_prefetch(pf, 0, 2);
          }
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int n = 0; n < 8; ++n) acc[n] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + (long)n * K + k), acc[n]);
      }
      for (int n = 0; n < 8; ++n) y[b * 16 + t * 8 + n] = hsum(acc[n]);
    }
  }
}
template <int V>
double run(std::vector<Layer>& Ls, const float* x, float* y) {
  auto t0 = std::chrono::steady_clock::now();
  for (auto& L : Ls) {
    const int nb = L.N / 16;
#pragma omp parallel
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      const int per = (nb + T - 1) / T, b0 = t * per, b1 = std::min(nb, b0 + per);
      if (b0 < b1) layer<V>(L, x, y, b0, b1);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
int main() {
  std::vector<Layer> Ls;
  int shapes[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
  double bytes = 0;
  for (int i = 0; i < 30; ++i) for (auto& s : shapes) Ls.push_back({s[0], s[1], nullptr});
  Ls.push_back({49152, 576, nullptr});
  for (auto& L : Ls) {
    L.w = static_cast<float*>(std::aligned_alloc(64, (size_t)L.N * L.K * 4 + 64 * 16 * 4 * 1536));
    for (long i = 0; i < (long)L.N * L.K; ++i) L.w[i] = 0.001f * (i % 7);
    bytes += (double)L.N * L.K * 4;
  }
  std::vector<float> x(1536, 1.f), y(49152);
  const char* names[] = {"tiles, no prefetch", "tiles + prefetch T1 (ours)", "prefetch 2 blocks", "prefetch T0", "prefetch NTA", "pure sum", "row at a time"};
  double best[7] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9};
  for (int rep = 0; rep < 7; ++rep) {
    double t[7] = {run<0>(Ls, x.data(), y.data()), run<1>(Ls, x.data(), y.data()), run<2>(Ls, x.data(), y.data()),
                   run<3>(Ls, x.data(), y.data()), run<4>(Ls, x.data(), y.data()), run<5>(Ls, x.data(), y.data()),
                   run<6>(Ls, x.data(), y.data())};
    for (int v = 0; v < 7; ++v) best[v] = std::min(best[v], t[v]);
    std::printf("round %d:", rep);
    for (int v = 0; v < 7; ++v) std::printf(" %.1f", bytes / t[v] / 1e9);
    std::printf("  GB/s\n");
  }
  for (int v = 0; v < 7; ++v) std::printf("%-28s best %.1f GB/s\n", names[v], bytes / best[v] / 1e9);
}
