// The op schemas of the plm_engine:: namespace and their CPU / CUDA kernels. Fake (meta) impls and
// autograd are registered from Python (plm_engine/ops/extension.py), next to the public functions.
#include <torch/extension.h>

#include "cpu/isa.h"
#include "ops.h"

TORCH_LIBRARY(plm_engine, m) {
  m.def("norm_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps, bool is_rms)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor mean, Tensor rstd,"
        " bool has_bias, bool is_rms) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("norm_fwd", &plm_engine::norm_fwd_cpu);
  m.impl("norm_bwd", &plm_engine::norm_bwd_cpu);
}

#ifdef PLM_ENGINE_WITH_CUDA
TORCH_LIBRARY_IMPL(plm_engine, CUDA, m) {
  m.impl("norm_fwd", &plm_engine::norm_fwd_cuda);
  m.impl("norm_bwd", &plm_engine::norm_bwd_cuda);
}
#endif

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
  m.def("set_cpu_isa", &plm_engine::cpu::set_cpu_isa, "caps the CPU kernels' instruction set (or 'best')");
}
