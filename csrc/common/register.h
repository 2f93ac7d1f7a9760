// The one registration of a file's device kernels (bindings.cpp's header describes the pattern):
//
//   PLM_REGISTER_KERNELS(CPU, cpu, norm_fwd, norm_bwd)
//
// is TORCH_LIBRARY_IMPL(plm_engine, CPU, m) with m.impl("norm_fwd", &plm_engine::cpu_norm_fwd) and so on:
// the entry point of op NAME for a device is plm_engine::<prefix>_NAME, so a file lists only its ops.
// tests/utils.py reads these lines to build the test matrix of which op has which kernel.
#pragma once
#include <torch/library.h>

#define PLM_IMPL_(prefix, op) m.impl(#op, &plm_engine::prefix##_##op);

// PLM_EACH_N(f, s, a1, ..., aN) is f(s, a1) ... f(s, aN); up to 12 ops a file (attention has 11).
#define PLM_EACH_1(f, s, a) f(s, a)
#define PLM_EACH_2(f, s, a, ...) f(s, a) PLM_EACH_1(f, s, __VA_ARGS__)
#define PLM_EACH_3(f, s, a, ...) f(s, a) PLM_EACH_2(f, s, __VA_ARGS__)
#define PLM_EACH_4(f, s, a, ...) f(s, a) PLM_EACH_3(f, s, __VA_ARGS__)
#define PLM_EACH_5(f, s, a, ...) f(s, a) PLM_EACH_4(f, s, __VA_ARGS__)
#define PLM_EACH_6(f, s, a, ...) f(s, a) PLM_EACH_5(f, s, __VA_ARGS__)
#define PLM_EACH_7(f, s, a, ...) f(s, a) PLM_EACH_6(f, s, __VA_ARGS__)
#define PLM_EACH_8(f, s, a, ...) f(s, a) PLM_EACH_7(f, s, __VA_ARGS__)
#define PLM_EACH_9(f, s, a, ...) f(s, a) PLM_EACH_8(f, s, __VA_ARGS__)
#define PLM_EACH_10(f, s, a, ...) f(s, a) PLM_EACH_9(f, s, __VA_ARGS__)
#define PLM_EACH_11(f, s, a, ...) f(s, a) PLM_EACH_10(f, s, __VA_ARGS__)
#define PLM_EACH_12(f, s, a, ...) f(s, a) PLM_EACH_11(f, s, __VA_ARGS__)
#define PLM_COUNT_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, N, ...) N
#define PLM_CAT_(a, b) a##b
#define PLM_CAT(a, b) PLM_CAT_(a, b)
#define PLM_EACH_(f, s, ...) \
  PLM_CAT(PLM_EACH_, PLM_COUNT_(__VA_ARGS__, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0))(f, s, __VA_ARGS__)

#define PLM_REGISTER_KERNELS(KEY, prefix, ...) \
  TORCH_LIBRARY_IMPL(plm_engine, KEY, m) {     \
    PLM_EACH_(PLM_IMPL_, prefix, __VA_ARGS__)  \
  }
