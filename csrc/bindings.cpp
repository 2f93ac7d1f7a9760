// plm_engine._C: the Python module (build and CPU-ISA queries, below) and, through the other files, the
// torch.ops.plm_engine ops. How a kernel is registered, the one way every op family does it:
//
//   csrc/<family>.h          the family's contract (the ops, shapes, dtypes) and the declarations of its
//                            argument checks; included by the family's files below.
//   csrc/<family>_ops.cpp    TORCH_LIBRARY_FRAGMENT(plm_engine, m): the family's op schemas (m.def), and
//                            the argument checks its device entry points share. The checks cover what the
//                            kernels index (shapes, dtypes, devices, strides): a direct torch.ops call
//                            never reads out of bounds. The argument contract itself (value ranges, eps,
//                            scale, ...) is checked once, by the public op in plm_engine/ops/<family>.py.
//   csrc/cpu/<family>.cpp    the CPU entry points (file-local, plm_engine::cpu_<op>), registered at the end of
//                            the file with PLM_REGISTER_KERNELS(CPU, cpu, <op>, ...) (common/register.h).
//   csrc/cuda/<family>.cu    the same for CUDA: cuda_<op>, PLM_REGISTER_KERNELS(CUDA, cuda, ...); its kernels live in
//                            cuda/<family>_kernels.cuh (also compiled on the CPU by tests/cuda_emu.py).
//
// Nothing else registers (tests/ops/test_norms_registration.py checks it). One exception: an op with no
// tensor argument has no device to dispatch on, so its schema is defined with its implementation
// (linear_ops.cpp's linear_cpu_isa). Fake (meta) impls and autograd are Python's (plm_engine/ops/contracts,
// given to the _C ops by plm_engine.ops.backends when a family's cpu/cuda backend is first chosen).
// ops.h lists the families and their files.
#include <torch/extension.h>

#include "common/cpu_memory.h"
#include "cpu/decode_step.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace {
bool cuda_built() {
#ifdef PLM_ENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The architectures nvcc compiled for, as setup.py passed them ("" in a CPU-only build). The macro
// holds a bare comma list (e.g. 80,90a): quoting it through the build's shell is fragile.
#define PLM_STRINGIFY(...) #__VA_ARGS__
#define PLM_EXPAND_STRINGIFY(...) PLM_STRINGIFY(__VA_ARGS__)
std::string cuda_archs() {
#ifdef PLM_ENGINE_CUDA_ARCHS
  return PLM_EXPAND_STRINGIFY(PLM_ENGINE_CUDA_ARCHS);
#else
  return "";
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "plm_engine compiled kernels; the ops live in torch.ops.plm_engine";
  m.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled into this build");
  m.def("cuda_archs", &cuda_archs, "CUDA architectures compiled into this build, comma-separated");
  m.def("openmp_threads", []() { return at::get_num_threads(); }, "threads the CPU kernels use");
  m.def("cpu_isa", []() { return std::string(plm_engine::cpu::isa_name(plm_engine::cpu::cpu_isa())); },
        "the instruction set the CPU kernels run with now");
  m.def("cpu_isa_supported", []() { return std::string(plm_engine::cpu::isa_name(plm_engine::cpu::cpu_isa_supported())); },
        "the best instruction set this CPU supports for the CPU kernels");
  m.def("cpu_huge_pages", []() { return plm_engine::cpu::huge_pages().why; },
        "whether large fresh CPU outputs get the transparent-huge-page hint, and why");
  m.def("set_cpu_isa", &plm_engine::cpu::set_cpu_isa, "caps the CPU kernels' instruction set (or 'best')");
  // The ops' eager CPU short path (plm_engine.ops.backends.eager_cpu_kernel): the registered CPU kernels
  // through their typed handles (cpu/kernels.h), which cost about half of a Python-side redispatch of
  // the op: for a small tensor that is a sizeable part of the call.
  namespace k = plm_engine::cpu_kernels;
  m.def("linear_fwd", &k::linear_fwd, "the linear_fwd op's CPU kernel (no autograd)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
  m.def("norm_fwd", &k::norm_fwd, "the norm_fwd op's CPU kernel (no autograd)");
  m.def("softmax_fwd", &k::softmax_fwd, "the softmax_fwd op's CPU kernel (no autograd)");
  m.def("swiglu_fwd", &k::swiglu_fwd, "the swiglu_fwd op's CPU kernel (no autograd)");
  m.def("gelu_fwd", &k::gelu_fwd, "the gelu_fwd op's CPU kernel (no autograd)");
  plm_engine::bind_decode_step(m);  // DecodeStep: the native CPU decode step (cpu/decode_step.cpp)
}
