// Type dispatch shared by the CPU kernels.
#pragma once
#include <ATen/Dispatch.h>

// fp32, fp16 and bf16: what the CPU kernels' argument checks accept (the types the vector loads cover).
#define PLM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
