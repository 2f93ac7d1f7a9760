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
// Not in a VM whose balloon reports free memory to the host (virtio-balloon free page reporting):
// the host takes back free 2 MiB blocks, exactly what a huge-page fault allocates next, so the first
// touch faults on the host as well and the hint turns into a gamble of 0.3x to 1.5x (NOTES.md).
// PLM_ENGINE_CPU_HUGEPAGES=0 turns the hint off, =1 on whatever the balloon does.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace plm_engine {
namespace cpu {

constexpr int64_t kHugePageMinBytes = int64_t{32} << 20;

// Whether a virtio-balloon device (virtio device id 5) has negotiated free page reporting (feature
// bit 5, VIRTIO_BALLOON_F_REPORTING): sysfs lists a device's negotiated features as a string of 0/1,
// bit 0 first.
inline bool balloon_reports_free_pages() {
  std::error_code ec;  // no sysfs, or no virtio bus: no balloon (the error_code overloads never throw)
  for (std::filesystem::directory_iterator it("/sys/bus/virtio/devices", ec), end; !ec && it != end;
       it.increment(ec)) {
    std::ifstream id(it->path() / "device"), features(it->path() / "features");
    std::string device, bits;
    std::getline(id, device);
    std::getline(features, bits);
    if (device == "0x0005" && bits.size() > 5 && bits[5] == '1') return true;
  }
  return false;
}

// Whether large fresh outputs get the hint, and why: PLM_ENGINE_CPU_HUGEPAGES=0 / 1 if set; otherwise
// when the kernel honours MADV_HUGEPAGE (THP mode "always" or "madvise", not "never") and no balloon
// hands free memory back to the host. `plm-engine info` prints the reason.
struct HugePages {
  bool on;
  std::string why;
};

inline const HugePages& huge_pages() {
  static const HugePages hp = []() -> HugePages {
    const char* env = std::getenv("PLM_ENGINE_CPU_HUGEPAGES");
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string mode;
    std::getline(f, mode);
    const bool thp = !mode.empty() && mode.find("[never]") == std::string::npos;
    if (env != nullptr && std::string(env) == "0") return {false, "off (PLM_ENGINE_CPU_HUGEPAGES=0)"};
    if (!thp) return {false, "off (transparent huge pages unavailable or 'never')"};
    if (env != nullptr && std::string(env) == "1") return {true, "on (PLM_ENGINE_CPU_HUGEPAGES=1)"};
    if (balloon_reports_free_pages())
      return {false, "off (virtio-balloon free page reporting; PLM_ENGINE_CPU_HUGEPAGES=1 forces it)"};
    return {true, "on"};
  }();
  return hp;
}

inline bool huge_pages_enabled() { return huge_pages().on; }

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
