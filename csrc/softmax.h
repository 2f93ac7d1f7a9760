// Softmax (with scale and a bottom-right causal mask): kernel entry points, argument checks, and the
// vectorisable fp32 helpers the CPU softmax and cross-entropy kernels share.
//
// Contract (every device):
//   softmax_fwd(x, scale, causal) -> y
//     x: (batch, sq, sk) contiguous fp32/fp16/bf16. y = softmax(scale * x) over the last dim, x's dtype,
//     fp32 math. causal masks key j > i + (sk - sq) for query row i (bottom-right aligned). A row whose
//     unmasked entries are all -inf (or that has none) gives zeros, never NaN.
//   softmax_bwd(dy, y, scale) -> dx = scale * y * (dy - sum(dy * y)) over the last dim.
//     Masked and -inf positions have y = 0, so their gradient is 0 with no mask needed.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace plm_engine {

using at::Tensor;

Tensor softmax_fwd_cpu(const Tensor& x, double scale, bool causal);
Tensor softmax_bwd_cpu(const Tensor& dy, const Tensor& y, double scale);
#ifdef PLM_ENGINE_WITH_CUDA
Tensor softmax_fwd_cuda(const Tensor& x, double scale, bool causal);
Tensor softmax_bwd_cuda(const Tensor& dy, const Tensor& y, double scale);
#endif

// Shared validation (softmax_ops.cpp), used by both devices.
void check_softmax_fwd_args(const Tensor& x, double scale);
void check_softmax_bwd_args(const Tensor& dy, const Tensor& y, double scale);

// Number of keys query row i of a (sq, sk) causal score matrix may see: keys 0 .. i + sk - sq.
inline int64_t causal_keys(int64_t i, int64_t sq, int64_t sk) {
  return std::min<int64_t>(sk, std::max<int64_t>(0, i + sk - sq + 1));
}

namespace cpu {

// exp(x) for fp32 written so that the compiler vectorises loops calling it (libm's expf does not
// vectorise without -ffast-math). Range reduction x = k ln2 + r, |r| <= ln2 / 2, then a degree-7
// Taylor polynomial (truncation error r^8 / 8! < 6e-9 relative, below fp32 rounding), then 2^k from
// the exponent bits. Inputs below -87.3 (including -inf) give 0: after max subtraction those terms are
// below fp32 resolution of a sum that is >= 1 anyway.
inline float exp_approx(float x) {
  const bool underflow = x < -87.3f;
  x = std::min(std::max(x, -87.3f), 88.f);  // 2^k stays finite: k <= 127
  // Round-to-nearest with the 1.5 * 2^23 trick: exact, and vectorises without SSE4.1's roundps.
  const float k = (x * 1.44269504f + 12582912.f) - 12582912.f;
  // ln2 split into a 9-bit head (k * head is exact for |k| <= 2^15) and a correction.
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return underflow ? 0.f : p * two_k;
}

// T -> fp32 that vectorises: bf16 is the high half of an fp32, so a shift of the raw bits (c10's
// conversion operator is not inlined into the target_clones bodies, which keeps loops scalar).
inline float to_f32(float v) { return v; }
inline float to_f32(double v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }
inline float to_f32(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 -> T rounding that the compiler can vectorise. c10::BFloat16's own conversion branches on NaN,
// which keeps the output loops scalar; this is the same round-to-nearest-even on the bits (a NaN whose
// payload sits only in the low 16 bits would round to inf; softmax outputs and gradients are never such).
template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// Rows are processed in column blocks of this many values, converted to fp32 in a stack buffer that
// stays in L1 while the block's max and exp-sum are taken: one read of the row from memory per pass.
constexpr int64_t kBlock = 2048;

// Online (max, sum of exp(v - max)) of v = scale * x[0 .. n). Each block's max is found first, then the
// running sum is rescaled once per block (not per element), so the inner loops vectorise. An all -inf
// input returns (-inf, 0).
template <typename T>
inline std::pair<float, float> row_max_sumexp(const T* x, int64_t n, float scale, float* buf) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m = kNegInf, s = 0.f;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    float bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < len; ++i) {
      const float v = to_f32(x[b0 + i]) * scale;
      buf[i] = v;
      bm = bm > v ? bm : v;  // not std::max: its reference return blocks vectorisation
    }
    if (bm == kNegInf) continue;  // nothing but -inf here: contributes exp(-inf) = 0
    if (bm > m) {
      s = (m == kNegInf) ? 0.f : s * exp_approx(m - bm);
      m = bm;
    }
    float bs = 0.f;
#pragma omp simd reduction(+ : bs)
    for (int64_t i = 0; i < len; ++i) bs += exp_approx(buf[i] - m);
    s += bs;
  }
  return {m, s};
}

}  // namespace cpu
}  // namespace plm_engine
