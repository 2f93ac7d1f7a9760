// SwiGLU and GELU on the CPU, forward and backward.
//
// The work is cut into chunks of up to CHUNK elements of one row (a contiguous input is one long row)
// and spread over threads with at::parallel_for. Each chunk runs a unit-stride loop of fp32 math:
// the chunk kernels (cpu/activations_kernels.inc) are written once against the vector policy of simd.h
// and compiled for every instruction set; cpu_isa() picks the build once per chunk. exp, sigmoid and the
// normal CDF are branch-free polynomial code (glibc's expf / erff do not vectorise).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "common/cpu_convert.h"
#include "common/cpu_memory.h"
#include "common/dispatch.h"
#include "common/gelu.h"
#include "common/register.h"
#include "cpu/isa.h"
#include "cpu/simd.h"

namespace plm_engine {
namespace {

constexpr int64_t CHUNK = 4096;
// Elements ahead of the exact-GELU loops' software prefetch (8 KiB of fp32).
constexpr int64_t kPrefetchAhead = 2048;

// ---- exact GELU: the normal CDF Phi without erf ------------------------------------------------------
// Phi(-a) = exp(-a^2 / 2) S(a) for a = |x|, where S(a) = Phi(-a) e^(a^2/2) is smooth (0.5 at 0, ~1/(a
// sqrt(2 pi)) for large a). Phi(-a) is then accurate relative to itself everywhere, so GELU has no
// cancellation in the x << 0 tail (unlike PyTorch's x (1 + erf(x / sqrt 2)) / 2), and there is no
// division. Beyond a = 13.2, Phi(-a) < 1e-39 (an fp32 denormal) and is taken as 0.
//
// Cost, not accuracy, decides the shapes below (fp32 GELU must keep up with PyTorch eager's erf):
//  - S is a piecewise polynomial over 8 intervals of a, so that each coefficient is a lookup in an
//    8-entry table, one register permute per coefficient on every x86 build (VPERMPS on AVX2, VPERMPS of
//    the table broadcast to both halves on AVX-512), with no gather and no transpose; degree 8 in the
//    interval's own variable u in [-0.5, 0.5]. Fitted for this file: Lawson's iteratively reweighted least
//    squares toward the minimax relative error on 3000 Chebyshev nodes per interval, against fp64
//    0.5 erfcx(a / sqrt 2), rounding the coefficients to fp32 one at a time from u^0 up and refitting
//    the higher ones after each rounding. Max relative error with the fp32 coefficients 3.5e-8 (20001
//    points per interval); evaluated in fp32 about 1 ulp.
//  - exp(-a^2 / 2) by a 16-entry table of 2^(j/16) and a degree-3 polynomial (see kExp2Bits): ~2 ulp.
// The interval of a is k = round(a * kPhiInvWidth): interval k is centred at k / kPhiInvWidth, so
// interval 0 is half wide and interval 7 ends at 7.5 / kPhiInvWidth = kPhiTop (the largest fp32 below
// kPhiTop still rounds to k = 7).
constexpr float kPhiTop = 13.2f;
constexpr float kPhiInvWidth = 0.5681818127632141f;  // fp32(7.5 / 13.2); the fit used this exact value
constexpr float kRound = 12582912.f;                 // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
// kPhiCoef[j][k]: coefficient of u^j on interval k (one aligned 8-float row per j: one AVX2 register).
alignas(32) constexpr float kPhiCoef[9][8] = {
    {0.5f, 0.1844865083694458f, 0.10581301152706146f, 0.07309640198945999f, 0.05558761954307556f, 0.044770270586013794f, 0.03744857385754585f, 0.032172419130802155f},
    {-0.702138364315033f, -0.13067297637462616f, -0.04660563915967941f, -0.02286818064749241f, -0.01338556595146656f, -0.008736460469663143f, -0.006134200841188431f, -0.004537402186542749f},
    {0.7743958234786987f, 0.0833461731672287f, 0.019517548382282257f, 0.0069567542523145676f, 0.0031678450759500265f, 0.001685013878159225f, 0.000996398739516735f, 0.000635979522485286f},
    {-0.7248812913894653f, -0.04886981472373009f, -0.007816878147423267f, -0.002062162384390831f, -0.0007374173146672547f, -0.0003213433374185115f, -0.00016053869330789894f, -8.858783985488117e-05f},
    {0.5985611081123352f, 0.02670344151556492f, 0.003007924649864435f, 0.0006011459627188742f, 0.0001689938799245283f, 6.124458013800904e-05f, 2.6682200768846087e-05f, 1.1565084605535958e-05f},
    {-0.44200652837753296f, -0.013673349283635616f, -0.0011146723991259933f, -0.0001691316720098257f, -3.8105972635094076e-05f, -1.142696783063002e-05f, -4.216562047076877e-06f, -1.6608105397608597e-06f},
    {0.2829337418079376f, 0.006672608200460672f, 0.00039925711462274194f, 1.87261412065709e-05f, 8.3024378909613e-06f, -1.783006723599101e-06f, -5.697325377695961e-06f, 4.645769877242856e-06f},
    {-0.13810282945632935f, -0.003448689356446266f, -0.00014751219714526087f, -1.1493058991618454e-05f, -1.954786966962274e-06f, -6.317151957091482e-08f, 3.213085619790945e-07f, -1.296349836366062e-07f},
    {0.03654978796839714f, 0.0015169404214248061f, 5.102358409203589e-05f, 5.746176611864939e-05f, 7.59615545575798e-07f, 7.56472172724898e-06f, 1.2353663805697579e-05f, -8.692937626619823e-06f},
};

// e^h for h = -a^2 / 2 in [-87.2, 0] (a < kPhiTop): k = round(h * 16 / ln2), e^h = 2^(k / 16) e^r with
// |r| <= ln2 / 32 (ln2 / 16 = kExpC1 + kExpC2, kExpC1 with 12 significant bits so that k * kExpC1 is
// exact). 2^(k/16) = 2^(k >> 4) 2^(j/16), j = k & 15, in one integer add: kExp2Bits[j] holds
// bits(2^(j/16)) - (j << 19), so kExp2Bits[j] + (k << 19) puts k >> 4 into the exponent field (k is the
// low bits of h * 16 / ln2 + kRound, whose own high bits shift out). Valid while the result is a normal
// number, which a < kPhiTop guarantees (e^-87.12 > 2^-126); the kernels zero the lanes outside.
constexpr float kExpK = 23.083120346069336f;          // 16 / ln2
constexpr float kExpC1 = 0.0433197021484375f;         // 2839 / 2^16
constexpr float kExpC2 = 1.9966364561696537e-06f;     // ln2 / 16 - kExpC1
alignas(64) constexpr uint32_t kExp2Bits[16] = {
    0x3f800000, 0x3f7daac3, 0x3f7b95c2, 0x3f79c3d3, 0x3f7837f0, 0x3f76f532, 0x3f75fed7, 0x3f75583f,
    0x3f7504f3, 0x3f7508a4, 0x3f75672a, 0x3f76248c, 0x3f7744fd, 0x3f78ccdf, 0x3f7ac0c7, 0x3f7d257d,
};

#define PLM_SIMD_KERNELS "cpu/activations_kernels.inc"
#include "cpu/simd_instantiate.inc"

// The build of chunk kernel `name` for the current ISA, as a function pointer: one choice per op call,
// so a whole op (and a whole lookup table) comes from one build.
#ifdef PLM_SIMD_X86
#define PLM_ACT_CHUNK(name, ...)                                                                  \
  (cpu::build_for(cpu::cpu_isa()) == cpu::Isa::kAvx512 ? &avx512::name<__VA_ARGS__>              \
   : cpu::cpu_isa() == cpu::Isa::kAvx2                 ? &avx2::name<__VA_ARGS__>                \
                                                       : &generic::name<__VA_ARGS__>)
#else
#define PLM_ACT_CHUNK(name, ...) (&generic::name<__VA_ARGS__>)
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
// erf-free normal CDF (one gather per vector; 128 KiB / 256 KiB tables stay in L2). Every ISA build
// computes the same bits (activations_kernels.inc), so the tables do not depend on which build made them.
template <typename T>
const uint16_t* gelu_lut16() {
  static const std::vector<uint16_t> lut = [] {
    std::vector<uint16_t> bits(65536);
    for (uint32_t i = 0; i < 65536; ++i) bits[i] = static_cast<uint16_t>(i);
    std::vector<uint16_t> out(65536 + 1, 0);  // + 1: the AVX gathers read 4 bytes per entry
    const auto chunk = PLM_ACT_CHUNK(gelu_fwd_chunk, T);
    chunk(reinterpret_cast<const T*>(bits.data()), reinterpret_cast<T*>(out.data()), 65536, false);
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
    const auto chunk = PLM_ACT_CHUNK(gelu_bwd_chunk, float);
    chunk(ones.data(), x.data(), out.data(), 65536, false);
    return out;
  }();
  return lut.data();
}

// Element (r, c) of one tensor of a Shape2d problem: row r at the tensor's row stride.
template <typename T>
struct Rows {
  T* p;
  int64_t stride;
  T* operator()(int64_t r, int64_t c) const { return p + r * stride + c; }
};

// A problem whose tensors are all densely packed rows is one long row: longer chunks, fewer tasks.
struct Shape2d {
  int64_t rows, n;
  // An input's rows (any row stride; one long row has only row 0) and a fresh output's (stride n).
  template <typename T>
  Rows<const T> in(const Tensor& t) const {
    return {t.const_data_ptr<T>(), rows > 1 ? t.stride(0) : 0};
  }
  template <typename T>
  Rows<T> out(Tensor& t) const {
    return {t.mutable_data_ptr<T>(), n};
  }
};

Shape2d flat_shape(std::initializer_list<const Tensor*> ts) {
  const int64_t rows = ts.begin()[0]->size(0), n = ts.begin()[0]->size(1);
  for (const Tensor* t : ts) {
    if (rows > 1 && t->stride(0) != n) return {rows, n};
  }
  return {1, rows * n};
}

Tensor cpu_swiglu_fwd(const Tensor& gate, const Tensor& up) {
  check_activation_args({{"gate", &gate}, {"up", &up}});
  Tensor y = cpu::empty_output(gate.sizes(), gate.options());
  const Shape2d s = flat_shape({&gate, &up, &y});
  PLM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    const auto g = s.in<scalar_t>(gate), u = s.in<scalar_t>(up);
    const auto out = s.out<scalar_t>(y);
    const auto chunk = PLM_ACT_CHUNK(swiglu_fwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(g(r, c0), u(r, c0), out(r, c0), len);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> cpu_swiglu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  check_activation_args({{"gate", &gate}, {"up", &up}, {"dy", &dy}});
  Tensor dg = cpu::empty_output(gate.sizes(), gate.options());
  Tensor du = cpu::empty_output(gate.sizes(), gate.options());
  const Shape2d s = flat_shape({&dy, &gate, &up, &dg});
  PLM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    const auto d = s.in<scalar_t>(dy), g = s.in<scalar_t>(gate), u = s.in<scalar_t>(up);
    const auto dgp = s.out<scalar_t>(dg), dup = s.out<scalar_t>(du);
    const auto chunk = PLM_ACT_CHUNK(swiglu_bwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(d(r, c0), g(r, c0), u(r, c0), dgp(r, c0), dup(r, c0), len);
    });
  });
  return {dg, du};
}

Tensor cpu_gelu_fwd(const Tensor& x, const std::string& approximate) {
  check_activation_args({{"x", &x}});
  const bool tanh = approximate == "tanh";
  Tensor y = cpu::empty_output(x.sizes(), x.options());
  const Shape2d s = flat_shape({&x, &y});
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gelu_fwd_cpu", [&] {
    const auto xp = s.in<scalar_t>(x);
    const auto out = s.out<scalar_t>(y);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (!tanh) {
        const uint16_t* lut = gelu_lut16<scalar_t>();
        const auto look = PLM_ACT_CHUNK(lut16_chunk, scalar_t);
        for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) { look(xp(r, c0), lut, out(r, c0), len); });
        return;
      }
    }
    const auto chunk = PLM_ACT_CHUNK(gelu_fwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) { chunk(xp(r, c0), out(r, c0), len, tanh); });
  });
  return y;
}

Tensor cpu_gelu_bwd(const Tensor& dy, const Tensor& x, const std::string& approximate) {
  check_activation_args({{"x", &x}, {"dy", &dy}});
  const bool tanh = approximate == "tanh";
  Tensor dx = cpu::empty_output(x.sizes(), x.options());
  const Shape2d s = flat_shape({&dy, &x, &dx});
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gelu_bwd_cpu", [&] {
    const auto d = s.in<scalar_t>(dy), xp = s.in<scalar_t>(x);
    const auto out = s.out<scalar_t>(dx);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (!tanh) {
        const float* lut = gelu_grad_lut16<scalar_t>();
        const auto look = PLM_ACT_CHUNK(lut16_scale_chunk, scalar_t);
        for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
          look(d(r, c0), xp(r, c0), lut, out(r, c0), len);
        });
        return;
      }
    }
    const auto chunk = PLM_ACT_CHUNK(gelu_bwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(d(r, c0), xp(r, c0), out(r, c0), len, tanh);
    });
  });
  return dx;
}

}  // namespace
}  // namespace plm_engine

PLM_REGISTER_KERNELS(CPU, cpu, swiglu_fwd, swiglu_bwd, gelu_fwd, gelu_bwd)
