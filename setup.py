"""Builds plm_engine._C.

The C++ CPU kernels are always compiled (-O3, OpenMP). The CUDA kernels are added when torch was built
with CUDA and nvcc is found; no GPU is needed to compile them. Environment:
  PLM_ENGINE_CUDA_ARCHS       e.g. "80;90a" (default) -> -gencode for each, plus PTX for the newest
  PLM_ENGINE_SKIP_CUDA_BUILD  "1" builds the CPU kernels only
  MAX_JOBS                    parallel compile jobs (ninja)
  CUDA_HOME                   CUDA toolkit; found from nvcc otherwise
"""

import glob
import os
import shutil
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit folder that holds bin/nvcc, or None.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper script
    (here /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so we look a little harder.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for c in candidates:
        # A real toolkit has the runtime header and library, not just an nvcc on its bin/ (/usr/local/bin/nvcc
        # here is a wrapper script, and /usr/local has neither).
        if (
            c
            and os.path.isfile(os.path.join(c, "bin", "nvcc"))
            and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))
            and (glob.glob(os.path.join(c, "lib64", "libcudart*")) or glob.glob(os.path.join(c, "lib", "libcudart*")))
        ):
            return c
    return None


def cuda_wanted():
    if os.environ.get("PLM_ENGINE_SKIP_CUDA_BUILD", "0") == "1":
        print("plm_engine: PLM_ENGINE_SKIP_CUDA_BUILD=1, building the CPU kernels only")
        return None
    import torch

    if torch.version.cuda is None:
        warnings.warn("plm_engine: this torch has no CUDA support; building the CPU kernels only", stacklevel=1)
        return None
    cuda_home = find_cuda_home()
    if cuda_home is None:
        warnings.warn("plm_engine: nvcc not found (set CUDA_HOME); building the CPU kernels only", stacklevel=1)
        return None
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = cuda_home
    return cuda_home


def gencode_flags():
    archs = os.environ.get("PLM_ENGINE_CUDA_ARCHS", "80;90a")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the newest arch so newer GPUs can JIT it; without the "a" suffix, since arch-specific
    # PTX (compute_90a) does not run on later architectures.
    newest = max((a.rstrip("af") for a in archs), key=int)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags, archs


def nvidia_wheel_includes():
    # ATen/cuda headers include cusparse.h / cublas_v2.h, which a minimal toolkit may lack; torch's
    # nvidia-* wheels ship them under site-packages/nvidia/cu*/include.
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for p in nvidia.__path__:
        dirs += [d for d in sorted(glob.glob(os.path.join(p, "cu*", "include"))) if os.path.isdir(d)]
        dirs += [d for d in sorted(glob.glob(os.path.join(p, "*", "include"))) if os.path.isdir(d)]
    return list(dict.fromkeys(dirs))


def extensions():
    cuda_home = cuda_wanted()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -g0 overrides the -g in Python's default CFLAGS: debug info triples the build time and .so size.
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if cuda_home is None:
        ext = CppExtension(
            "plm_engine._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    else:
        flags, archs = gencode_flags()
        cu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        print(f"plm_engine: building CUDA kernels with {cuda_home} for sm_{', sm_'.join(archs)}")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr", *flags]
        # The arch list goes to the C++ compiler only (bindings.cpp reports it): nvcc splits option
        # values at commas, so -DPLM_ENGINE_CUDA_ARCHS=80,90a would reach it as a bogus "-D90a".
        cxx_cuda = cxx + [f"-DPLM_ENGINE_CUDA_ARCHS={','.join(archs)}"]
        ext = CUDAExtension(
            "plm_engine._C",
            sources + cu_sources,
            include_dirs=include_dirs + nvidia_wheel_includes(),
            define_macros=[("PLM_ENGINE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_cuda, "nvcc": nvcc},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
