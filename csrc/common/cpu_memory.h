// Fresh output buffers for the memory-bound CPU kernels (norms, activations), with a transparent
// huge-page hint on large ones.
//
// A buffer of 32 MiB or more comes straight from mmap (glibc's mmap threshold never grows past 32 MiB),
// so the first touch of each 4 KiB page faults and zeroes it: for a 64 MiB output that costs several
// times an elementwise kernel itself (figures in benchmarks/results/NOTES.md). MADV_HUGEPAGE on the
// not-yet-touched buffer makes each fault map (and zero) 2 MiB at once.
// It is only a hint: no effect when THP is "never", and it changes no data. It is what PyTorch's
// THP_MEM_ALLOC_ENABLE=1 does for every allocation; here it applies to our large outputs only.
// Smaller buffers are mostly reused heap memory, where the hint measured slower.
// PLM_ENGINE_CPU_HUGEPAGES=0 turns it off.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace plm_engine {
namespace cpu {

constexpr int64_t kHugePageMinBytes = int64_t{32} << 20;

// Whether large fresh outputs get the hint: the kernel honours MADV_HUGEPAGE (THP mode "always" or
// "madvise", not "never") and PLM_ENGINE_CPU_HUGEPAGES=0 did not switch it off.
inline bool huge_pages_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("PLM_ENGINE_CPU_HUGEPAGES");
    if (env != nullptr && std::string(env) == "0") return false;
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string mode;
    std::getline(f, mode);
    return !mode.empty() && mode.find("[never]") == std::string::npos;
  }();
  return on;
}

inline void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  if (bytes >= kHugePageMinBytes && huge_pages_enabled()) {
    const auto p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: errors are ignored
  }
#else
  (void)out;
#endif
}

// at::empty_like / at::empty with the huge-page hint on a large fresh buffer.
inline at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  advise_huge_pages(out);
  return out;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}

}  // namespace cpu
}  // namespace plm_engine
