// Detection and capping of the CPU kernels' instruction set (see isa.h).
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace plm_engine {
namespace cpu {
namespace {

Isa detect() {
  Isa best = Isa::kGeneric;
#ifdef PLM_SIMD_X86
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2) best = Isa::kAvx2;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = Isa::kAvx512;
    if (__builtin_cpu_supports("avx512bf16")) best = Isa::kAvx512Bf16;
  }
#endif
  return best;
}

bool parse(const std::string& name, Isa* out) {
  if (name == "generic" || name == "neon") *out = Isa::kGeneric;
  else if (name == "avx2") *out = Isa::kAvx2;
  else if (name == "avx512") *out = Isa::kAvx512;
  else if (name == "avx512_bf16" || name == "avx512bf16") *out = Isa::kAvx512Bf16;
  else return false;
  return true;
}

// The environment caps the level; it may name a level above the CPU's (the same setting is shared by
// machines of different kinds), which then simply has no effect. An unknown name is an error at the
// first kernel call, with the accepted values.
Isa initial() {
  const Isa best = detect();
  const char* env = std::getenv("PLM_ENGINE_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "best") return best;
  Isa cap;
  TORCH_CHECK(parse(env, &cap), "PLM_ENGINE_CPU_ISA=", env,
              " is not an instruction set; expected one of generic, avx2, avx512, avx512_bf16, best");
  return std::min(best, cap);
}

std::atomic<int>& current() {
  static std::atomic<int> value{static_cast<int>(initial())};
  return value;
}

}  // namespace

Isa cpu_isa_supported() {
  static const Isa best = detect();
  return best;
}

Isa cpu_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_cpu_isa(const std::string& name) {
  Isa want = cpu_isa_supported();
  if (name != "best") {
    TORCH_CHECK(parse(name, &want), "unknown instruction set '", name,
                "'; expected one of generic, avx2, avx512, avx512_bf16, best");
    TORCH_CHECK(want <= cpu_isa_supported(), "this CPU supports the CPU kernels' instruction sets up to ",
                isa_name(cpu_isa_supported()), ", not ", name);
  }
  current().store(static_cast<int>(want), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    default:
#ifdef PLM_SIMD_NEON
      return "neon";
#else
      return "generic";
#endif
  }
}

}  // namespace cpu
}  // namespace plm_engine
