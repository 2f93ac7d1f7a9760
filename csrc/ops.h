// Every op family of _C and where its parts are (the registration pattern: bindings.cpp's header):
//
//   family          contract + checks     schemas + checks        CPU kernels            CUDA kernels
//   norms           norms.h               norm_ops.cpp            cpu/norms.cpp          cuda/norms.cu
//   softmax         softmax.h             softmax_ops.cpp         cpu/softmax.cpp        cuda/softmax.cu
//   rope            rope.h                rope_ops.cpp            cpu/rope.cpp           cuda/rope.cu
//   activations     activations.h         activation_ops.cpp      cpu/activations.cpp    cuda/activations.cu
//   cross_entropy   cross_entropy.h       cross_entropy_ops.cpp   cpu/cross_entropy.cpp  -
//   attention       attention.h           attention_ops.cpp       cpu/attention.cpp      cuda/paged_attention.cu
//                                                                                        (paged ops only)
//   linear          linear.h              linear_ops.cpp          cpu/linear.cpp         -
//   token_mask      token_mask.h          token_mask_ops.cpp      cpu/token_mask.cpp     - (Triton on GPUs)
//
// The device entry points are file-local to their kernel files, so no header declares them; this one
// includes every family header, which keeps them compiling together.
#pragma once

#include "activations.h"
#include "attention.h"
#include "cross_entropy.h"
#include "linear.h"
#include "norms.h"
#include "rope.h"
#include "softmax.h"
#include "token_mask.h"
