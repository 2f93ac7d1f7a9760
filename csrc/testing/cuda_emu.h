// A small emulation of the CUDA thread model, so that the kernel bodies in csrc/cuda/*_kernels.cuh
// compile as host C++ and run on the CPU in tests (tests/ops/test_cuda_emulated.py). Test-only: no
// build of the package includes this file.
//
// Model. Blocks run one after another on the calling OS thread. The threads of a block are fibers
// (ucontext), run cooperatively: a fiber runs until it reaches a synchronisation point
// (__syncthreads, a warp shuffle or vote, __syncwarp) or returns, then the scheduler picks the next
// runnable one. So shared memory needs no locking, a `static` array is a correct __shared__ array (one
// block is alive at a time), and atomics are plain read-modify-writes.
//
// Strictness. Everything CUDA leaves undefined and a GPU might forgive is an error here, raised as
// plm_emu::Error from emu_launch with the thread and source line: a __syncthreads that some thread of
// the block never reaches (exit, divergent branch, a different __syncthreads), a warp collective whose
// mask names a lane that exited, does not exist, or runs a different collective, a shuffle reading a
// lane outside the mask, and any state where no thread can make progress (deadlock), instead of a hang.
// Between synchronisation points threads run one at a time in a fixed order (forward, reverse, or
// alternating per block), so code that skips a needed barrier usually reads stale or missing data and
// fails the comparison with the reference: lanes of a warp are not implicitly synchronous either.
//
// Not emulated: dynamic (extern) shared memory, which no kernel uses; memory fences and the memory
// model beyond the barriers (a single OS thread makes every write visible at once); the accuracy of
// --use_fast_math intrinsics (host libm is more accurate, which the tolerance tests allow);
// __launch_bounds__ limits (ignored). Shared memory is not poisoned between blocks: `static` locals of
// templates cannot be enumerated, so a read before any write sees the previous block's data (zeros on
// the first launch), not garbage; the alternating resume order still makes most such races visible.
//
// Needs C++20 (__VA_OPT__), glibc's ucontext, and the host parts of a CUDA toolkit's headers
// (cuda_fp16.h, cuda_bf16.h, vector_types.h and what they include); no nvcc, no GPU.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h compiles CUDA kernel bodies as host code; it must not be compiled by nvcc"
#endif

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The host halves of the CUDA headers: vector types (float2, uint4, dim3), make_float2, and the
// __half / __nv_bfloat16 types with their host conversions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

// Execution-space and launch qualifiers: plain host functions here. __shared__ becomes `static`, so
// each __shared__ declaration is one object seen by all fibers of the (single live) block.
#undef __device__
#undef __host__
#undef __global__
#undef __shared__
#undef __launch_bounds__
#define __device__
#define __host__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

namespace plm_emu {

// Raised by emu_launch when a kernel breaks the execution model (see the file comment).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The order in which runnable threads of a block are resumed between synchronisation points.
// kAlternate runs even blocks forward and odd blocks in reverse, so a missing barrier is exposed
// whichever side (low or high thread ids) writes and whichever reads.
enum class Order { kForward, kReverse, kAlternate };

constexpr int kWarpSize = 32;

namespace detail {

enum class State { kRunnable, kBlockBarrier, kWarpCollective, kExited };
enum class Op { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kShflIdx: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  State state = State::kRunnable;
  const char* file = "";  // where the fiber waits
  int line = 0;
  // The pending warp collective: what this lane contributes, and what it gets back.
  Op op = Op::kSyncWarp;
  unsigned mask = 0;
  int param = 0;
  int width = kWarpSize;
  std::uint64_t value = 0;
  bool pred = false;
  std::uint64_t result = 0;
};

// Fiber stacks, kept between launches. Each has a PROT_NONE guard page below it, so an overflow
// faults instead of silently overwriting the neighbouring fiber's stack.
class StackPool {
 public:
  static constexpr std::size_t kStackBytes = 256 * 1024;
  ~StackPool() {
    for (char* p : stacks_) munmap(p - page(), kStackBytes + page());
  }
  char* get(std::size_t i) {
    while (stacks_.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw Error("cuda_emu: cannot map a fiber stack");
      mprotect(p, page(), PROT_NONE);
      stacks_.push_back(static_cast<char*>(p) + page());
    }
    return stacks_[i];
  }

 private:
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<char*> stacks_;
};

struct Runtime {
  std::mutex launch_mutex;  // one emulated launch at a time: the state below is global
  ucontext_t scheduler;
  std::vector<Fiber> fibers;  // the current block's threads, by linear id
  Fiber* current = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim, block_dim;
  int block_arrived = 0;  // threads waiting at __syncthreads
  std::string error;      // set by a fiber that broke the model; emu_launch throws it
  const std::function<void()>* body = nullptr;
  Order order = Order::kAlternate;
  StackPool stacks;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Fiber& cur() {
  Fiber* f = rt().current;
  if (f == nullptr) {
    // Device code called outside emu_launch: no thread to answer threadIdx & co. Nothing sensible to
    // return, and throwing from here is safe (we are on the caller's own stack).
    throw Error("cuda_emu: device code (threadIdx, __syncthreads, ...) used outside emu_launch");
  }
  return *f;
}

inline std::string where(const Fiber& f) {
  std::ostringstream s;
  s << "block (" << rt().block_idx.x << "," << rt().block_idx.y << "," << rt().block_idx.z << ") thread ("
    << f.tid.x << "," << f.tid.y << "," << f.tid.z << ")";
  return s.str();
}

inline std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  Runtime& r = rt();
  Fiber* self = r.current;
  swapcontext(&self->ctx, &r.scheduler);
}

// Records the first violation and leaves the fiber for good: the scheduler throws on the launching
// thread's stack (an exception cannot unwind across fiber stacks).
[[noreturn]] inline void fail(const std::string& msg) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = msg;
  Fiber* self = r.current;
  self->state = State::kExited;
  setcontext(&r.scheduler);
  std::abort();  // setcontext does not return
}

// ---- __syncthreads --------------------------------------------------------------------------------

inline void syncthreads(const char* file, int line) {
  Runtime& r = rt();
  Fiber& self = cur();
  for (const Fiber& f : r.fibers) {
    if (f.state == State::kExited)
      fail(where(self) + " waits at __syncthreads (" + site(file, line) + ") but " + where(f) +
           " has already exited: the barrier can never complete");
  }
  self.state = State::kBlockBarrier;
  self.file = file;
  self.line = line;
  if (++r.block_arrived < static_cast<int>(r.fibers.size())) {
    yield();
    return;
  }
  // Last arrival: every thread must be at the same __syncthreads (undefined behaviour otherwise).
  for (const Fiber& f : r.fibers) {
    if (f.file != file || f.line != line)
      fail("divergent __syncthreads: " + where(self) + " at " + site(file, line) + ", " + where(f) + " at " +
           site(f.file, f.line));
  }
  r.block_arrived = 0;
  for (Fiber& f : r.fibers) f.state = State::kRunnable;
}

// ---- warp collectives -----------------------------------------------------------------------------

// The source lane of a shuffle for `lane`, or `lane` itself where CUDA returns the caller's own value.
inline int shfl_source(const Fiber& f, int lane) {
  const int w = f.width;
  const int base = lane & ~(w - 1);
  switch (f.op) {
    case Op::kShflIdx: return base + (f.param & (w - 1));
    case Op::kShflUp: return lane - f.param >= base ? lane - f.param : lane;
    case Op::kShflDown: return lane + f.param < base + w ? lane + f.param : lane;
    case Op::kShflXor: {
      const int src = lane ^ f.param;
      return src < base + w && src < kWarpSize ? src : lane;
    }
    default: return lane;
  }
}

inline std::uint64_t collective(Op op, unsigned mask, std::uint64_t value, int param, int width, bool pred,
                                const char* file, int line) {
  Runtime& r = rt();
  Fiber& self = cur();
  const int warp0 = self.linear - self.linear % kWarpSize;
  const int lane = self.linear % kWarpSize;
  const std::string name = op_name(op);
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
    fail(where(self) + ": " + name + " width " + std::to_string(width) + " is not a power of two in [1, 32]");
  if (!(mask >> lane & 1u))
    fail(where(self) + " calls " + name + " (" + site(file, line) + ") with a mask that excludes its own lane");
  self.op = op;
  self.mask = mask;
  self.param = param;
  self.width = width;
  self.value = value;
  self.pred = pred;
  self.file = file;
  self.line = line;
  self.state = State::kWarpCollective;

  bool complete = true;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u) || l == lane) continue;
    const int id = warp0 + l;
    if (id >= static_cast<int>(r.fibers.size()))
      fail(where(self) + ": " + name + " (" + site(file, line) + ") mask names lane " + std::to_string(l) +
           ", which does not exist in this block");
    const Fiber& f = r.fibers[id];
    if (f.state == State::kExited)
      fail(where(self) + ": " + name + " (" + site(file, line) + ") waits for lane " + std::to_string(l) +
           ", which has already exited");
    if (f.state != State::kWarpCollective) {
      complete = false;
    } else if (f.mask == mask && (f.op != op || f.width != width)) {
      fail("divergent warp collective: " + where(self) + " at " + name + " (" + site(file, line) + "), " +
           where(f) + " at " + op_name(f.op) + " (" + site(f.file, f.line) + ")");
    } else if (f.mask != mask) {
      complete = false;  // that lane is in another collective; it may still come to this one
    }
  }
  if (!complete) {
    yield();
    return self.result;
  }
  // Every lane of the mask is here with the same collective: compute all their results at once, so a
  // lane that runs on first cannot overwrite a value another lane has yet to read.
  unsigned votes = 0;
  for (int l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1u && r.fibers[warp0 + l].pred) votes |= 1u << l;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = r.fibers[warp0 + l];
    switch (op) {
      case Op::kBallot: f.result = votes; break;
      case Op::kAny: f.result = votes != 0; break;
      case Op::kAll: f.result = votes == mask; break;
      case Op::kSyncWarp: f.result = 0; break;
      default: {
        const int src = shfl_source(f, l);
        if (!(mask >> src & 1u))
          fail(where(f) + ": " + name + " (" + site(file, line) + ") reads lane " + std::to_string(src) +
               ", which is not in the mask (undefined value)");
        f.result = r.fibers[warp0 + src].value;
      }
    }
    f.state = State::kRunnable;
  }
  return self.result;
}

template <typename T>
inline std::uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values are at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(std::uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
inline T shfl(Op op, unsigned mask, T v, int param, int width, const char* file, int line) {
  return from_bits<T>(collective(op, mask, to_bits(v), param, width, false, file, line));
}

// ---- scheduling -----------------------------------------------------------------------------------

inline void fiber_main() {
  Runtime& r = rt();
  (*r.body)();
  Fiber& self = *r.current;
  if (r.block_arrived > 0) {
    for (const Fiber& f : r.fibers)
      if (f.state == State::kBlockBarrier)
        fail(where(self) + " exited while " + std::to_string(r.block_arrived) + " thread(s) wait at __syncthreads (" +
             site(f.file, f.line) + "): the barrier can never complete");
  }
  const int warp0 = self.linear - self.linear % kWarpSize;
  for (int l = 0; l < kWarpSize && warp0 + l < static_cast<int>(r.fibers.size()); ++l) {
    const Fiber& f = r.fibers[warp0 + l];
    if (f.state == State::kWarpCollective && (f.mask >> (self.linear % kWarpSize) & 1u))
      fail(where(self) + " exited while " + where(f) + " waits for it in " + op_name(f.op) + " (" +
           site(f.file, f.line) + ")");
  }
  self.state = State::kExited;
  setcontext(&r.scheduler);
}

inline std::string describe_deadlock() {
  Runtime& r = rt();
  std::ostringstream s;
  s << "deadlock in block (" << r.block_idx.x << "," << r.block_idx.y << "," << r.block_idx.z
    << "): no thread can make progress;";
  int shown = 0;
  for (const Fiber& f : r.fibers) {
    if (f.state == State::kExited) continue;
    if (shown++ == 8) {
      s << " ...";
      break;
    }
    s << " thread (" << f.tid.x << "," << f.tid.y << "," << f.tid.z << ") waits at "
      << (f.state == State::kBlockBarrier ? "__syncthreads" : op_name(f.op)) << " (" << site(f.file, f.line) << ");";
  }
  return s.str();
}

inline void run_block() {
  Runtime& r = rt();
  const int n = static_cast<int>(r.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f = Fiber{};
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i % r.block_dim.x), static_cast<unsigned>(i / r.block_dim.x % r.block_dim.y),
                  static_cast<unsigned>(i / (r.block_dim.x * r.block_dim.y))};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks.get(i);
    f.ctx.uc_stack.ss_size = StackPool::kStackBytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  r.block_arrived = 0;
  const std::uint64_t linear_block =
      r.block_idx.x + static_cast<std::uint64_t>(r.grid_dim.x) * (r.block_idx.y + r.grid_dim.y * r.block_idx.z);
  const bool reverse = r.order == Order::kReverse || (r.order == Order::kAlternate && linear_block % 2 == 1);
  for (;;) {
    bool ran = false, alive = false;
    for (int k = 0; k < n; ++k) {
      Fiber& f = r.fibers[reverse ? n - 1 - k : k];
      if (f.state != State::kRunnable) {
        alive = alive || f.state != State::kExited;
        continue;
      }
      r.current = &f;
      swapcontext(&r.scheduler, &f.ctx);
      r.current = nullptr;
      if (!r.error.empty()) return;
      ran = true;
      alive = alive || f.state != State::kExited;
    }
    if (!alive) return;
    if (!ran) {
      r.error = describe_deadlock();
      return;
    }
  }
}

inline void check_launch(dim3 grid, dim3 block, std::size_t smem_bytes) {
  const std::uint64_t threads = static_cast<std::uint64_t>(block.x) * block.y * block.z;
  std::ostringstream s;
  if (threads == 0 || threads > 1024 || block.z > 64)
    s << "block (" << block.x << "," << block.y << "," << block.z << ") is not a valid CUDA block";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    s << "grid (" << grid.x << "," << grid.y << "," << grid.z << ") is not a valid CUDA grid";
  else if (smem_bytes != 0)
    s << "dynamic shared memory (" << smem_bytes << " bytes) is not emulated";
  if (!s.str().empty()) throw Error("cuda_emu: invalid launch: " + s.str());
}

inline void run_grid(dim3 grid, dim3 block, std::size_t smem_bytes, const std::function<void()>& body) {
  check_launch(grid, block, smem_bytes);
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  r.grid_dim = grid;
  r.block_dim = block;
  r.body = &body;
  r.fibers.assign(static_cast<std::size_t>(block.x) * block.y * block.z, Fiber{});
  r.error.clear();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.block_idx = uint3{x, y, z};
        run_block();
        if (!r.error.empty()) {
          std::string msg = "cuda_emu: " + r.error;
          r.error.clear();
          r.body = nullptr;
          throw Error(msg);
        }
      }
  r.body = nullptr;
}

}  // namespace detail

// Sets the resume order for the following launches (see Order); returns the previous one.
inline Order set_order(Order order) {
  std::lock_guard<std::mutex> lock(detail::rt().launch_mutex);
  Order old = detail::rt().order;
  detail::rt().order = order;
  return old;
}

// kernel<<<grid, block, smem_bytes>>>(args...), run to completion on the calling thread. The arguments
// are converted to the kernel's parameter types once, as a launch does, and every thread gets its own
// copy of them (by-value parameters).
template <typename... Params, typename... Args>
void emu_launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "emu_launch: wrong number of kernel arguments");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  detail::run_grid(grid, block, smem_bytes, body);
}

inline const uint3& thread_idx() { return detail::cur().tid; }
inline const uint3& block_idx() {
  detail::cur();
  return detail::rt().block_idx;
}
inline const dim3& block_dim() {
  detail::cur();
  return detail::rt().block_dim;
}
inline const dim3& grid_dim() {
  detail::cur();
  return detail::rt().grid_dim;
}

}  // namespace plm_emu

// ---- the CUDA built-ins, in the global namespace like the real ones -------------------------------

#define threadIdx (::plm_emu::thread_idx())
#define blockIdx (::plm_emu::block_idx())
#define blockDim (::plm_emu::block_dim())
#define gridDim (::plm_emu::grid_dim())
#define warpSize (::plm_emu::kWarpSize)

#define __syncthreads() ::plm_emu::detail::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::plm_emu::detail::syncwarp_at(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

// Shuffles and votes take the call site as extra arguments, for the error messages; the macros keep
// CUDA's signatures (width defaults to the warp size).
#define PLM_EMU_SHFL(op, mask, v, param, ...) \
  ::plm_emu::detail::shfl_at(::plm_emu::detail::Op::op, __FILE__, __LINE__, mask, v, param __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, v, src, ...) PLM_EMU_SHFL(kShflIdx, mask, v, src __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_up_sync(mask, v, delta, ...) PLM_EMU_SHFL(kShflUp, mask, v, delta __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_down_sync(mask, v, delta, ...) PLM_EMU_SHFL(kShflDown, mask, v, delta __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) PLM_EMU_SHFL(kShflXor, mask, v, lane_mask __VA_OPT__(, ) __VA_ARGS__)
#define PLM_EMU_VOTE(op, mask, pred) \
  ::plm_emu::detail::vote_at(::plm_emu::detail::Op::op, __FILE__, __LINE__, mask, pred)
#define __ballot_sync(mask, pred) PLM_EMU_VOTE(kBallot, mask, pred)
#define __any_sync(mask, pred) static_cast<int>(PLM_EMU_VOTE(kAny, mask, pred))
#define __all_sync(mask, pred) static_cast<int>(PLM_EMU_VOTE(kAll, mask, pred))

namespace plm_emu {
namespace detail {

template <typename T>
inline T shfl_at(Op op, const char* file, int line, unsigned mask, T v, int param, int width = kWarpSize) {
  return shfl(op, mask, v, param, width, file, line);
}

inline unsigned vote_at(Op op, const char* file, int line, unsigned mask, bool pred) {
  return static_cast<unsigned>(collective(op, mask, 0, 0, kWarpSize, pred, file, line));
}

inline void syncwarp_at(const char* file, int line, unsigned mask = 0xffffffffu) {
  collective(Op::kSyncWarp, mask, 0, 0, kWarpSize, false, file, line);
}

}  // namespace detail
}  // namespace plm_emu

// ---- atomics: plain read-modify-writes (one OS thread; a fiber never switches inside one) --------

namespace plm_emu {
namespace detail {
// *p = update(*p), returning the old value: every atomic below.
template <typename T, typename F>
inline T read_modify_write(T* p, F update) {
  const T old = *p;
  *p = update(old);
  return old;
}
}  // namespace detail
}  // namespace plm_emu

template <typename T>
inline T atomicAdd(T* p, T v) {
  return plm_emu::detail::read_modify_write(p, [v](T old) { return old + v; });
}
template <typename T>
inline T atomicMax(T* p, T v) {
  return plm_emu::detail::read_modify_write(p, [v](T old) { return old < v ? v : old; });
}
template <typename T>
inline T atomicMin(T* p, T v) {
  return plm_emu::detail::read_modify_write(p, [v](T old) { return v < old ? v : old; });
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return plm_emu::detail::read_modify_write(p, [v](T) { return v; });
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  return plm_emu::detail::read_modify_write(p, [compare, v](T old) { return old == compare ? v : old; });
}

// ---- device math and bit casts used by the kernels, as host functions -----------------------------

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
// The standard normal CDF through erfc, which keeps its relative accuracy in the lower tail.
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }

namespace plm_emu {
namespace detail {
// The bits of v as a To (CUDA's __x_as_y intrinsics).
template <typename To, typename From>
inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}
}  // namespace detail
}  // namespace plm_emu

inline float __uint_as_float(unsigned u) { return plm_emu::detail::bits_as<float>(u); }
inline unsigned __float_as_uint(float f) { return plm_emu::detail::bits_as<unsigned>(f); }
inline float __int_as_float(int i) { return plm_emu::detail::bits_as<float>(i); }
inline int __float_as_int(float f) { return plm_emu::detail::bits_as<int>(f); }

// CUDA's unqualified integer and float min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
