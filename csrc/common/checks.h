// Argument checks shared by every kernel entry point. They raise c10::Error (RuntimeError in Python)
// with the offending value, so a bad call never reaches a kernel.
#pragma once
#include <torch/types.h>

#define PLM_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define PLM_CHECK_DIM(t, d) TORCH_CHECK((t).dim() == (d), #t " must have " #d " dims, got ", (t).dim())
#define PLM_CHECK_FLOAT(t)                                                                        \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||               \
                  (t).scalar_type() == at::kBFloat16,                                             \
              #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())
#define PLM_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device())
#define PLM_CHECK_SAME_DTYPE(a, b) \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " is ", (a).scalar_type(), " but " #b " is ", (b).scalar_type())
#define PLM_CHECK_SHAPE(a, b) \
  TORCH_CHECK((a).sizes() == (b).sizes(), #a " has shape ", (a).sizes(), " but " #b " has shape ", (b).sizes())
