// A decoder-only Transformer's whole decode step on the CPU as one C++ call (decode_step.cpp), bound
// into plm_engine._C as DecodeStep (plm_engine/generation/native_decode.py builds and runs it).
#pragma once
#include <torch/extension.h>

namespace plm_engine {

// Adds plm_engine._C.DecodeStep to the Python module (called from bindings.cpp).
void bind_decode_step(pybind11::module_& m);

}  // namespace plm_engine
