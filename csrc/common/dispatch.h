// Type dispatch shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/Dispatch.h>

// fp32, fp16 and bf16: the types the kernels are built for (a call with another type fails in the
// dispatch, before any memory is touched), so no kernels are instantiated for the rest.
#define PLM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The norms: T is x's dtype (fp32, fp16, bf16), W the weight's (fp32 or T; the argument checks ensure
// one of the two). The body sees both as type aliases.
#define PLM_DISPATCH_NORM_CASE(ST, WT, ...) \
  AT_DISPATCH_CASE(ST, [&] {                \
    using T = scalar_t;                     \
    if ((WT) == at::kFloat) {               \
      using W = float;                      \
      __VA_ARGS__();                        \
    } else {                                \
      using W = T;                          \
      __VA_ARGS__();                        \
    }                                       \
  })
#define PLM_DISPATCH_NORM_TYPES(XT, WT, NAME, ...)                      \
  AT_DISPATCH_SWITCH(XT, NAME,                                          \
                     PLM_DISPATCH_NORM_CASE(at::kFloat, WT, __VA_ARGS__) \
                     PLM_DISPATCH_NORM_CASE(at::kHalf, WT, __VA_ARGS__)  \
                     PLM_DISPATCH_NORM_CASE(at::kBFloat16, WT, __VA_ARGS__))

namespace plm_engine {

// Calls fn(T{}) with T the C++ type of dtype (fp32, fp16, bf16), for a generic lambda
// `[&](auto tag) { using T = decltype(tag); ... }`: unlike the macros' scalar_t, such dispatches nest.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

}  // namespace plm_engine
