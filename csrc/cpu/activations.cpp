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
#include "cpu/isa.h"
#include "cpu/simd.h"

namespace plm_engine {
namespace {

constexpr int64_t CHUNK = 4096;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK0 = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhK1 = 0.044715f;
// Elements ahead of the exact-GELU loops' software prefetch (8 KiB of fp32).
constexpr int64_t kPrefetchAhead = 2048;

// ---- exact GELU: the normal CDF Phi without erf ------------------------------------------------------
// Phi(-a) = exp(-a^2 / 2) S(a) for a = |x|, where S(a) = Phi(-a) e^(a^2/2) is smooth (0.5 at 0, ~1/(a
// sqrt(2 pi)) for large a). Phi(-a) is then accurate relative to itself everywhere, so GELU has no
// cancellation in the x << 0 tail (unlike PyTorch's x (1 + erf(x / sqrt 2)) / 2), and there is no
// division. Beyond a = 13.2, Phi(-a) < 1e-39 (an fp32 denormal) and is taken as 0.
//
// Cost, not accuracy, decides the shapes below (fp32 GELU must keep up with PyTorch eager's erf):
//  - S is a piecewise polynomial over 32 intervals of a, so that each coefficient is a register-table
//    lookup (one VPERMT2PS on AVX-512, four VPERMPS and three blends on AVX2) with no gather; degree 5 in
//    the interval's own variable u in [-0.5, 0.5]. Fitted for this file: Lawson's iteratively reweighted
//    least squares toward the minimax relative error on 3000 Chebyshev nodes per interval, against fp64
//    0.5 erfcx(a / sqrt 2). Max relative error of the fit 2.7e-8; evaluated in fp32 with the
//    coefficients rounded (100k points per interval) 1.2e-7, about 2 ulp.
//  - exp(-a^2 / 2) by a 16-entry table of 2^(j/16) and a degree-3 polynomial (see kExp2Bits): ~2 ulp.
// The interval of a is k = round(a * kPhiInvWidth): interval k is centred at k / kPhiInvWidth, so
// interval 0 is half wide and interval 31 ends at 31.5 / kPhiInvWidth = kPhiTop.
constexpr float kPhiTop = 13.2f;
constexpr float kPhiInvWidth = 2.3863637447357178f;  // fp32(31.5 / 13.2); the fit used this exact value
constexpr float kRound = 12582912.f;                 // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
// kPhiCoef[j][k]: coefficient of u^j on interval k (one aligned 32-float row per j: two 16-lane halves
// for VPERMT2PS).
alignas(64) constexpr float kPhiCoef[6][32] = {
    {0.5f, 0.3685714602470398f, 0.28555941581726074f, 0.2299734652042389f, 0.190903440117836f, 0.16231460869312286f, 0.14068248867988586f, 0.12384870648384094f, 0.11043568700551987f, 0.09953178465366364f, 0.09051427990198135f, 0.0829458087682724f, 0.07651153951883316f, 0.07097984850406647f, 0.06617702543735504f, 0.06197049841284752f, 0.05825751647353172f, 0.0549573190510273f, 0.05200563371181488f, 0.04935070872306824f, 0.04695044830441475f, 0.04477027431130409f, 0.042781535536050797f, 0.04096031188964844f, 0.03928647190332413f, 0.03774295747280121f, 0.03631523251533508f, 0.0349908247590065f, 0.033758990466594696f, 0.03261040151119232f, 0.03153694421052933f, 0.03053152561187744f},
    {-0.167175754904747f, -0.10245432704687119f, -0.06688683480024338f, -0.046025171875953674f, -0.03308454528450966f, -0.02466285228729248f, -0.018951989710330963f, -0.014940203167498112f, -0.012034963816404343f, -0.009874973446130753f, -0.008231918327510357f, -0.006956863682717085f, -0.0059498753398656845f, -0.005142181180417538f, -0.004485373850911856f, -0.003944679629057646f, -0.0034946580417454243f, -0.00311638368293643f, -0.0027955658733844757f, -0.0025212636683136225f, -0.0022849952802062035f, -0.0020801096688956022f, -0.0019013355486094952f, -0.001744454842992127f, -0.001606061472557485f, -0.0014833819586783648f, -0.0013741409638896585f, -0.0012764575658366084f, -0.001188766909763217f, -0.0011097590904682875f, -0.0010383304907009006f, -0.0009735468192957342f},
    {0.043899036943912506f, 0.023364489898085594f, 0.013326579704880714f, 0.008068566210567951f, 0.005142006557434797f, 0.003424224676564336f, 0.0023680145386606455f, 0.0016916700406000018f, 0.0012428981717675924f, 0.0009356896043755114f, 0.0007195326033979654f, 0.0005637053982354701f, 0.00044892632286064327f, 0.0003627469122875482f, 0.00029692306998185813f, 0.0002458679082337767f, 0.0002057154051726684f, 0.0001737391867209226f, 0.00014798299525864422f, 0.00012702083040494472f, 0.00010979803482769057f, 9.552416304359213e-05f, 8.359944331459701e-05f, 7.356362766586244e-05f, 6.505978672066703e-05f, 5.780843639513478e-05f, 5.1588707719929516e-05f, 4.622459891834296e-05f, 4.157474177191034e-05f, 3.7524754588957876e-05f, 3.3981428714469075e-05f, 3.086833385168575e-05f},
    {-0.009775245562195778f, -0.004629381932318211f, -0.002354986732825637f, -0.0012771494220942259f, -0.0007326232152990997f, -0.0004414366849232465f, -0.0002776730398181826f, -0.00018136440485250205f, -0.00012243764649610966f, -8.509319741278887e-05f, -6.067481081117876e-05f, -4.425708175403997e-05f, -3.2940053642960265e-05f, -2.496270462870598e-05f, -1.922525916597806e-05f, -1.5023199011920951e-05f, -1.1894627277797554e-05f, -9.530251190881245e-06f, -7.718913366261404e-06f, -6.3138777477433905e-06f, -5.211499228607863e-06f, -4.3374598135415e-06f, -3.637726422311971e-06f, -3.0725066153536318e-06f, -2.6121433620573953e-06f, -2.23428742174292e-06f, -1.921921239045332e-06f, -1.661962869548006e-06f, -1.4442634892475326e-06f, -1.2608832093974343e-06f, -1.1055615232180571e-06f, -9.733241768117296e-07f},
    {0.0018873783992603421f, 0.0008300983463414013f, 0.00038121326360851526f, 0.00018722907407209277f, 9.762414993019775e-05f, 5.36803127033636e-05f, 3.094122439506464e-05f, 1.859545591287315e-05f, 1.1597936463658698e-05f, 7.476005976059241e-06f, 4.962619186699158e-06f, 3.3817584608186735e-06f, 2.359271320528933e-06f, 1.681056346569676e-06f, 1.220822696268442e-06f, 9.019839239954308e-07f, 6.769056994926359e-07f, 5.152660378371365e-07f, 3.973487423536426e-07f, 3.100801961863908e-07f, 2.446338953632221e-07f, 1.9495061565066862e-07f, 1.5680618048463657e-07f, 1.2721332609544334e-07f, 1.0403122985280788e-07f, 8.570657428208506e-08f, 7.109924382575628e-08f, 5.936330538247603e-08f, 4.986472745827086e-08f, 4.212378357237867e-08f, 3.57742422352203e-08f, 3.05341671946735e-08f},
    {-0.00026974844513460994f, -0.000134422502014786f, -5.641833195113577e-05f, -2.5370047296746634e-05f, -1.2140278158767615e-05f, -6.14340569882188e-06f, -3.268612999818288e-06f, -1.8189977026850102e-06f, -1.053878463608271e-06f, -6.330477049232286e-07f, -3.9280135410990624e-07f, -2.5095113187489915e-07f, -1.6460400331652636e-07f, -1.10567988542698e-07f, -7.589066086666207e-08f, -5.312056572392976e-08f, -3.785270763501103e-08f, -2.7417117465233787e-08f, -2.0157790103780826e-08f, -1.5025589661377126e-08f, -1.1342682348924882e-08f, -8.663107564643724e-09f, -6.6884737748296175e-09f, -5.2159756513958655e-09f, -4.105751738592289e-09f, -3.2600275812200152e-09f, -2.609578109158406e-09f, -2.104804330826937e-09f, -1.7097741000782207e-09f, -1.3981750202063381e-09f, -1.1505537633738072e-09f, -9.523954958012837e-10f},
};

// The same coefficients by interval: kPhiRows.r[k] = c0 .. c5 of interval k and two zeros (one 32-byte
// row per interval, for the AVX2 transpose).
struct alignas(32) PhiRows {
  float r[32][8];
};
constexpr PhiRows make_phi_rows() {
  PhiRows t{};
  for (int k = 0; k < 32; ++k)
    for (int j = 0; j < 6; ++j) t.r[k][j] = kPhiCoef[j][k];
  return t;
}
constexpr PhiRows kPhiRows = make_phi_rows();

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

}  // namespace

Tensor swiglu_fwd_cpu(const Tensor& gate, const Tensor& up) {
  check_activation_arg(gate, gate, "gate");
  check_activation_arg(up, gate, "up");
  Tensor y = cpu::empty_output(gate.sizes(), gate.options());
  const Shape2d s = flat_shape({&gate, &up, &y});
  const int64_t sg = s.rows > 1 ? gate.stride(0) : 0, su = s.rows > 1 ? up.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const auto chunk = PLM_ACT_CHUNK(swiglu_fwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(g + r * sg + c0, u + r * su + c0, out + r * s.n + c0, len);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> swiglu_bwd_cpu(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  check_activation_arg(gate, gate, "gate");
  check_activation_arg(up, gate, "up");
  check_activation_arg(dy, gate, "dy");
  Tensor dg = cpu::empty_output(gate.sizes(), gate.options());
  Tensor du = cpu::empty_output(gate.sizes(), gate.options());
  const Shape2d s = flat_shape({&dy, &gate, &up, &dg});
  const int64_t sd = s.rows > 1 ? dy.stride(0) : 0, sg = s.rows > 1 ? gate.stride(0) : 0,
                su = s.rows > 1 ? up.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    const scalar_t* d = dy.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dup = du.mutable_data_ptr<scalar_t>();
    const auto chunk = PLM_ACT_CHUNK(swiglu_bwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      const int64_t o = r * s.n + c0;
      chunk(d + r * sd + c0, g + r * sg + c0, u + r * su + c0, dgp + o, dup + o, len);
    });
  });
  return {dg, du};
}

Tensor gelu_fwd_cpu(const Tensor& x, const std::string& approximate) {
  check_activation_arg(x, x, "x");
  const bool tanh = gelu_is_tanh(approximate);
  Tensor y = cpu::empty_output(x.sizes(), x.options());
  const Shape2d s = flat_shape({&x, &y});
  const int64_t sx = s.rows > 1 ? x.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gelu_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (!tanh) {
        const uint16_t* lut = gelu_lut16<scalar_t>();
        const auto look = PLM_ACT_CHUNK(lut16_chunk, scalar_t);
        for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
          look(xp + r * sx + c0, lut, out + r * s.n + c0, len);
        });
        return;
      }
    }
    const auto chunk = PLM_ACT_CHUNK(gelu_fwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(xp + r * sx + c0, out + r * s.n + c0, len, tanh);
    });
  });
  return y;
}

Tensor gelu_bwd_cpu(const Tensor& dy, const Tensor& x, const std::string& approximate) {
  check_activation_arg(x, x, "x");
  check_activation_arg(dy, x, "dy");
  const bool tanh = gelu_is_tanh(approximate);
  Tensor dx = cpu::empty_output(x.sizes(), x.options());
  const Shape2d s = flat_shape({&dy, &x, &dx});
  const int64_t sd = s.rows > 1 ? dy.stride(0) : 0, sx = s.rows > 1 ? x.stride(0) : 0;
  PLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gelu_bwd_cpu", [&] {
    const scalar_t* d = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (!tanh) {
        const float* lut = gelu_grad_lut16<scalar_t>();
        const auto look = PLM_ACT_CHUNK(lut16_scale_chunk, scalar_t);
        for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
          look(d + r * sd + c0, xp + r * sx + c0, lut, out + r * s.n + c0, len);
        });
        return;
      }
    }
    const auto chunk = PLM_ACT_CHUNK(gelu_bwd_chunk, scalar_t);
    for_each_chunk(s.rows, s.n, [&](int64_t r, int64_t c0, int64_t len) {
      chunk(d + r * sd + c0, xp + r * sx + c0, out + r * s.n + c0, len, tanh);
    });
  });
  return dx;
}

}  // namespace plm_engine
