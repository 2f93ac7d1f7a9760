// The CPU kernels of the op families, callable from C++ (csrc/cpu/decode_step.cpp) with no Python in
// between. Each is the op's registered CPU kernel, the same function the eager path runs through
// torch.ops.plm_engine, reached through the dispatcher's typed handle with a redispatch on the CPU key:
// no autograd, no Python-registered fake or autograd impl, one table lookup per call. The
// kernels' own argument checks run as on every call (they cover what the kernels index).
//
// Calling the registered kernel instead of its C++ symbol keeps the kernel files as they are (their
// entry points stay file-local, ops.h) and makes every call visible to torch.profiler: each one opens
// a record-function scope named like the op ("plm_engine::norm_fwd"), which is how bench_generate's
// `overhead` case tells kernel time from host time inside one native decode step.
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>

namespace plm_engine {
namespace cpu_kernels {

using at::Tensor;

// norms.h: (y, h, mean, rstd); h is x + residual (empty without a residual).
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const Tensor& weight,
                                                    const std::optional<Tensor>& bias,
                                                    const std::optional<Tensor>& residual, double eps, bool is_rms);
// linear.h: x (M, K) @ weight (N, K)^T + bias.
Tensor linear_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias);
// linear.h: the same with the weight in GGUF blocks of type qtype (qweight (N, row_bytes) uint8).
Tensor linear_q_fwd(const Tensor& x, const Tensor& qweight, int64_t qtype, const std::optional<Tensor>& bias);
// rope.h: q (b, s, hq, d), k (b, s, hk, d) rotated in place.
void rope_(Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin, const std::optional<Tensor>& positions,
           bool interleaved, bool conjugate);
// attention.h: the new tokens' keys/values into the paged cache, and decode attention through it.
void write_kv_cache(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping);
Tensor paged_attn(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                  const Tensor& cache_seqlens, double scale);
// activations.h
Tensor swiglu_fwd(const Tensor& gate, const Tensor& up);
Tensor gelu_fwd(const Tensor& x, const std::string& approximate);
// softmax.h: x (batch, sq, sk) contiguous.
Tensor softmax_fwd(const Tensor& x, double scale, bool causal);

}  // namespace cpu_kernels
}  // namespace plm_engine
