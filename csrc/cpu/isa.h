// Which instruction set the CPU kernels run with, and how a kernel .cpp calls the right build.
//
// Every CPU kernel is written once against a vector policy (simd.h) and compiled once per instruction
// set into namespaces generic / avx2 / avx512 of the same binary (simd_instantiate.inc). cpu_isa()
// says which build runs:
//   generic      the portable policy: plain loops on x86-64 without AVX2; NEON on aarch64
//   avx2         AVX2 + FMA + F16C (8 fp32 lanes)
//   avx512       AVX-512F/BW/VL/DQ + FMA + F16C (16 fp32 lanes)
//   avx512_bf16  avx512 plus the AVX512_BF16 dot products (extra paths where a kernel has one)
// The best level the CPU supports is detected once; PLM_ENGINE_CPU_ISA (generic | avx2 | avx512 |
// avx512_bf16) caps it at start-up, and set_cpu_isa() caps it at run time (tests run every build on
// one machine that way). A level above what the CPU supports is an error, never a crash.
#pragma once
#include <cstdint>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC's `#pragma GCC target` regions compile the AVX2 / AVX-512 builds; other compilers get generic.
#define PLM_SIMD_X86 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define PLM_SIMD_NEON 1
#endif

namespace plm_engine {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The level the kernels use now (detected, capped by PLM_ENGINE_CPU_ISA and set_cpu_isa). One relaxed
// atomic load: cheap enough to call once per kernel launch.
Isa cpu_isa();
// The best level this CPU supports, ignoring every cap.
Isa cpu_isa_supported();
// Caps the level ("generic", "avx2", "avx512", "avx512_bf16" or "best"); throws for an unknown name or
// a level the CPU does not support.
void set_cpu_isa(const std::string& name);
// "generic" (or "neon" on aarch64), "avx2", "avx512", "avx512_bf16".
const char* isa_name(Isa isa);

// The policy builds compiled into this binary; a kernel's build for `isa`: AVX512_BF16 runs the avx512
// build (kernels with an extra BF16 path test cpu_isa() == Isa::kAvx512Bf16 themselves).
inline Isa build_for(Isa isa) { return isa == Isa::kAvx512Bf16 ? Isa::kAvx512 : isa; }

}  // namespace cpu
}  // namespace plm_engine

// PLM_CPU_CALL(fn, args...) calls the build of `fn` for the current ISA: avx512::fn, avx2::fn or
// generic::fn (namespaces made by simd_instantiate.inc inside the caller's namespace). Call it once per
// task or row range, never per element: it is a branch on an atomic.
#ifdef PLM_SIMD_X86
#define PLM_CPU_CALL(fn, ...)                                                                          \
  (::plm_engine::cpu::build_for(::plm_engine::cpu::cpu_isa()) == ::plm_engine::cpu::Isa::kAvx512       \
       ? avx512::fn(__VA_ARGS__)                                                                      \
       : ::plm_engine::cpu::cpu_isa() == ::plm_engine::cpu::Isa::kAvx2 ? avx2::fn(__VA_ARGS__)        \
                                                                       : generic::fn(__VA_ARGS__))
#else
#define PLM_CPU_CALL(fn, ...) generic::fn(__VA_ARGS__)
#endif
