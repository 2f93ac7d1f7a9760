// Kernels that test the emulator itself (tests/ops/test_cuda_emulated.py): barrier, shuffles, votes,
// atomics and built-in indices must behave as on a GPU, and broken kernels must fail with a clear
// error instead of hanging or passing.
#include "testing/emu_prelude.h"
//
#include <string>

namespace plm_emu_ops {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// Each thread publishes a value and reads its right neighbour's: only correct with the barrier. The
// salt keeps stale shared memory of an earlier launch or block from looking right.
__global__ void neighbour_kernel(int* out, int salt) {
  __shared__ int s[1024];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = t * 7 + salt + 1000 * blockIdx.x;
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

__global__ void neighbour_no_barrier_kernel(int* out, int salt) {
  __shared__ int s[1024];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = t * 7 + salt + 1000 * blockIdx.x;
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// The same exchange inside each warp, with and without __syncwarp: lanes are not implicitly in step.
__global__ void warp_neighbour_kernel(int* out, int salt, bool sync) {
  __shared__ int s[1024];
  const int t = threadIdx.x, lane = t % 32;
  s[t] = t * 3 + salt;
  if (sync) __syncwarp();
  out[t] = s[t - lane + (lane + 1) % 32];
}

// 10 results per thread: shuffles of every kind and width, of int and double values.
__global__ void shfl_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int v = 1 + lane * 10 + warp * 1000;
  int* o = out + t * 10;
  o[0] = __shfl_xor_sync(kFull, v, 1);
  o[1] = __shfl_xor_sync(kFull, v, 16);
  o[2] = __shfl_down_sync(kFull, v, 3);
  o[3] = __shfl_up_sync(kFull, v, 5);
  o[4] = __shfl_sync(kFull, v, 7);
  o[5] = __shfl_xor_sync(kFull, v, 4, 8);
  o[6] = __shfl_down_sync(kFull, v, 3, 16);
  o[7] = __shfl_up_sync(kFull, v, 2, 8);
  o[8] = __shfl_sync(kFull, v, 6, 4);
  o[9] = static_cast<int>(__shfl_xor_sync(kFull, static_cast<double>(v) + 0.25, 2) - 0.25);
}

// Half of the warp shuffles among itself (mask 0x0000ffff); the other half stays out.
__global__ void shfl_half_mask_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int v = 100 + lane;
  if (lane < 16) v = __shfl_xor_sync(0x0000ffffu, v, 8);
  out[threadIdx.x] = v;
}

__global__ void vote_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * 4;
  o[0] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  o[1] = __any_sync(kFull, lane == 5);
  o[2] = __all_sync(kFull, lane < 32);
  o[3] = __all_sync(kFull, lane < 31);
}

__global__ void atomic_kernel(int* out) {
  atomicAdd(&out[0], 1);
  atomicMax(&out[1], static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}

// Built-in indices on a 3-D grid of 3-D blocks: 6 values per thread at its global linear position.
__global__ void indices_kernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + (block * blockDim.x * blockDim.y * blockDim.z + thread) * 6;
  o[0] = threadIdx.x, o[1] = threadIdx.y, o[2] = threadIdx.z;
  o[3] = blockIdx.x, o[4] = blockIdx.y, o[5] = blockIdx.z;
}

// ---- broken kernels: each must raise plm_emu::Error ----

// A shuffle in a branch only half the warp takes, with the full mask: the other half exits.
__global__ void broken_divergent_shfl_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

// A barrier only some threads reach.
__global__ void broken_partial_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

// Two different barriers.
__global__ void broken_two_barriers_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane 0 waits at the block barrier while its warp waits for it in a shuffle: nobody can move.
__global__ void broken_deadlock_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int v = lane;
  if (lane == 0) __syncthreads();
  v = __shfl_xor_sync(kFull, v, 1);
  if (lane != 0) __syncthreads();
  out[threadIdx.x] = v;
}

// A shuffle that reads a lane outside its mask (undefined on a GPU).
__global__ void broken_shfl_outside_mask_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int v = lane;
  if (lane < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
  out[threadIdx.x] = v;
}

}  // namespace

void selftest(const char* name, int* out, int64_t out_len, int blocks, int threads) {
  using plm_emu::emu_launch;
  const std::string k = name;
  const dim3 grid(blocks), block(threads);
  auto need = [&](int64_t n) {
    if (out_len < n) throw std::invalid_argument("cuda_emu selftest: output too short for " + k);
  };
  if (k == "neighbour" || k == "neighbour_no_barrier") {
    need(int64_t{blocks} * threads);
    emu_launch(k == "neighbour" ? neighbour_kernel : neighbour_no_barrier_kernel, grid, block, 0, out, 17);
  } else if (k == "warp_neighbour" || k == "warp_neighbour_no_sync") {
    need(threads);
    // Different salts: the no-sync run must not find the synced run's values in the shared array.
    const bool sync = k == "warp_neighbour";
    emu_launch(warp_neighbour_kernel, dim3(1), block, 0, out, sync ? 5 : 9, sync);
  } else if (k == "shfl") {
    need(int64_t{threads} * 10);
    emu_launch(shfl_kernel, dim3(1), block, 0, out);
  } else if (k == "shfl_half_mask") {
    need(threads);
    emu_launch(shfl_half_mask_kernel, dim3(1), block, 0, out);
  } else if (k == "vote") {
    need(int64_t{threads} * 4);
    emu_launch(vote_kernel, dim3(1), block, 0, out);
  } else if (k == "atomic") {
    need(2);
    emu_launch(atomic_kernel, grid, block, 0, out);
  } else if (k == "indices") {
    need(2 * 3 * 2 * 4 * 2 * 3 * 6);
    emu_launch(indices_kernel, dim3(2, 3, 2), dim3(4, 2, 3), 0, out);
  } else if (k == "broken_divergent_shfl") {
    emu_launch(broken_divergent_shfl_kernel, grid, block, 0, out);
  } else if (k == "broken_partial_barrier") {
    emu_launch(broken_partial_barrier_kernel, grid, block, 0, out);
  } else if (k == "broken_two_barriers") {
    emu_launch(broken_two_barriers_kernel, grid, block, 0, out);
  } else if (k == "broken_deadlock") {
    emu_launch(broken_deadlock_kernel, grid, block, 0, out);
  } else if (k == "broken_shfl_outside_mask") {
    emu_launch(broken_shfl_outside_mask_kernel, grid, block, 0, out);
  } else if (k == "invalid_block") {
    emu_launch(atomic_kernel, grid, dim3(2048), 0, out);
  } else {
    throw std::invalid_argument("cuda_emu selftest: unknown kernel " + k);
  }
}

const char* set_order(const char* order) {
  const std::string o = order;
  plm_emu::Order next;
  if (o == "forward") {
    next = plm_emu::Order::kForward;
  } else if (o == "reverse") {
    next = plm_emu::Order::kReverse;
  } else if (o == "alternate") {
    next = plm_emu::Order::kAlternate;
  } else {
    throw std::invalid_argument("cuda_emu: unknown order " + o);
  }
  switch (plm_emu::set_order(next)) {
    case plm_emu::Order::kForward: return "forward";
    case plm_emu::Order::kReverse: return "reverse";
    default: return "alternate";
  }
}

}  // namespace plm_emu_ops
