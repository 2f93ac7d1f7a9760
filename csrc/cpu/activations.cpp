// SwiGLU and GELU on the CPU, forward and backward.
//
// The work is cut into chunks of up to CHUNK elements of one row (a contiguous input is one long row)
// and spread over threads with at::parallel_for. Each chunk runs a unit-stride loop of fp32 math that
// the compiler vectorises. glibc's expf/erff do not vectorise without -ffast-math, so exp and erfc are
// computed here by branch-free polynomial code; the hot loops are compiled for AVX-512, AVX2 and the
// baseline ISA (target_clones) and the loader picks the best one the CPU has.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>

#include "activations.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PLM_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PLM_VEC_CLONES
#endif

namespace plm_engine {
namespace {

constexpr int64_t CHUNK = 4096;
constexpr float kSqrt2Inv = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK0 = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhK1 = 0.044715f;

// e^x to ~2 ulp for x in [-87, 88] (clamped outside, which only affects results already 0 or inf
// in the formulas below). 2^n * e^r with n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2]
// (Cody-Waite split of ln2 so n * ln2_hi is exact), e^r by its degree-7 Taylor polynomial.
inline float exp_f32(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
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

inline float sigmoid_f32(float x) { return 1.f / (1.f + exp_f32(-x)); }

// erfc(z) for z >= 0 with ~2e-6 relative error everywhere (also deep in the tail, where 1 - erf(z)
// would cancel): erfc(z) = t exp(-z^2 + Q(t)), t = 1 / (1 + z/2), Q a degree-10 least-squares fit of
// log(erfc(z) / t) + z^2 over z in [0, 10], made for this file.
inline float erfc_nonneg_f32(float z) {
  const float t = 1.f / (1.f + 0.5f * z);
  float q = -0.1322232037782669f;
  q = q * t + 0.9186638593673706f;
  q = q * t - 2.660632610321045f;
  q = q * t + 4.066195964813232f;
  q = q * t - 3.408038854598999f;
  q = q * t + 1.5898021459579468f;
  q = q * t - 0.6849140524864197f;
  q = q * t + 0.21977999806404114f;
  q = q * t + 0.3553099036216736f;
  q = q * t + 1.0016276836395264f;
  q = q * t - 1.2655706405639648f;
  return t * exp_f32(q - z * z);
}

// The standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2, accurate relative to itself for x << 0.
inline float normal_cdf_f32(float x) {
  const float half_erfc = 0.5f * erfc_nonneg_f32((x < 0.f ? -x : x) * kSqrt2Inv);
  return x < 0.f ? half_erfc : 1.f - half_erfc;
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
    y[i] = cpu::store_raw<T>(v * (TANH ? gelu_tanh_cdf_f32(v) : normal_cdf_f32(v)));
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
      grad = normal_cdf_f32(v) + v * kInvSqrt2Pi * exp_f32(-0.5f * v * v);
    }
    dx[i] = cpu::store_raw<T>(cpu::load_raw<T>(dy[i]) * grad);
  }
}

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

// fp32, fp16, bf16 only: the checks refuse other dtypes, and cpu::load_f32 / store_as cover these.
#define PLM_DISPATCH_ACT_TYPES(TYPE, NAME, ...)                                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

Tensor swiglu_fwd_cpu(const Tensor& gate, const Tensor& up) {
  check_activation_arg(gate, gate, "gate");
  check_activation_arg(up, gate, "up");
  Tensor y = at::empty(gate.sizes(), gate.options());
  const Shape2d s = flat_shape({&gate, &up, &y});
  const int64_t sg = s.rows > 1 ? gate.stride(0) : 0, su = s.rows > 1 ? up.stride(0) : 0;
  PLM_DISPATCH_ACT_TYPES(gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      swiglu_fwd_chunk<scalar_t>(g + r * sg + c0, u + r * su + c0, out + r * s.n + c0, len);
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
  PLM_DISPATCH_ACT_TYPES(gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    const scalar_t* d = dy.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dup = du.mutable_data_ptr<scalar_t>();
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      const int64_t o = r * s.n + c0;
      swiglu_bwd_chunk<scalar_t>(d + r * sd + c0, g + r * sg + c0, u + r * su + c0, dgp + o, dup + o, len);
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
  PLM_DISPATCH_ACT_TYPES(x.scalar_type(), "gelu_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      if (tanh) {
        gelu_fwd_chunk<scalar_t, true>(xp + r * sx + c0, out + r * s.n + c0, len);
      } else {
        gelu_fwd_chunk<scalar_t, false>(xp + r * sx + c0, out + r * s.n + c0, len);
      }
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
  PLM_DISPATCH_ACT_TYPES(x.scalar_type(), "gelu_bwd_cpu", [&] {
    const scalar_t* d = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      if (tanh) {
        gelu_bwd_chunk<scalar_t, true>(d + r * sd + c0, xp + r * sx + c0, out + r * s.n + c0, len);
      } else {
        gelu_bwd_chunk<scalar_t, false>(d + r * sd + c0, xp + r * sx + c0, out + r * s.n + c0, len);
      }
    });
  });
  return dx;
}

}  // namespace plm_engine
