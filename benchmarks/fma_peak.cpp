// AVX2 FMA peak of this machine: 12 independent chains of 256-bit FMAs per OpenMP thread (enough to
// cover the FMA latency on two pipes). Used for the compute bound of the decode GEMV at M = 8 in
// benchmarks/results/NOTES.md.
//
//   g++ -O3 -funroll-loops -mavx2 -mfma -fopenmp benchmarks/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
int main() {
  const long iters = 200000000;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
      __m256 a[12];
      for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
      const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
      for (long k = 0; k < iters / 12; ++k)
        for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
      float o[8];
      __m256 s = a[0];
      for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
      _mm256_storeu_ps(o, s);
      sink += o[0];
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double lanefma = double(iters / 12 * 12) * 8 * omp_get_max_threads() / dt;
    if (lanefma > best) best = lanefma;
    std::printf("threads %d: %.1f G lane-FMA/s (sink %g)\n", omp_get_max_threads(), lanefma / 1e9, sink);
  }
  std::printf("best %.1f G lane-FMA/s\n", best / 1e9);
}
