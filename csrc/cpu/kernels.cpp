// kernels.h: the registered CPU kernels through typed dispatcher handles (found once, on first use).
#include "cpu/kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

namespace plm_engine {
namespace cpu_kernels {
namespace {

// The op's handle, typed like its CPU kernel (typed<> checks the signature against the registration).
template <class Fn>
c10::TypedOperatorHandle<Fn> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

const c10::DispatchKeySet kCpu(c10::DispatchKey::CPU);

}  // namespace

// Each entry: a profiler scope named like the op (a thread-local flag test when no profiler runs), then
// the CPU kernel.
#define PLM_CPU_KERNEL_CALL(op, Fn, ...)                                   \
  static const auto h = find<Fn>("plm_engine::" #op);                      \
  RECORD_FUNCTION("plm_engine::" #op, c10::ArrayRef<const c10::IValue>{}); \
  return h.redispatch(kCpu, __VA_ARGS__)

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const Tensor& weight,
                                                    const std::optional<Tensor>& bias,
                                                    const std::optional<Tensor>& residual, double eps, bool is_rms) {
  using Fn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                        const std::optional<Tensor>&, double, bool);
  PLM_CPU_KERNEL_CALL(norm_fwd, Fn, x, weight, bias, residual, eps, is_rms);
}

Tensor linear_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  using Fn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&);
  PLM_CPU_KERNEL_CALL(linear_fwd, Fn, x, weight, bias);
}

Tensor linear_q_fwd(const Tensor& x, const Tensor& qweight, int64_t qtype, const std::optional<Tensor>& bias) {
  using Fn = Tensor(const Tensor&, const Tensor&, int64_t, const std::optional<Tensor>&);
  PLM_CPU_KERNEL_CALL(linear_q_fwd, Fn, x, qweight, qtype, bias);
}

void rope_(Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin, const std::optional<Tensor>& positions,
           bool interleaved, bool conjugate) {
  using Fn = void(Tensor&, Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, bool, bool);
  PLM_CPU_KERNEL_CALL(rope_, Fn, q, k, cos, sin, positions, interleaved, conjugate);
}

void write_kv_cache(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping) {
  using Fn = void(const Tensor&, const Tensor&, Tensor, Tensor, const Tensor&);
  PLM_CPU_KERNEL_CALL(write_kv_cache, Fn, k, v, k_cache, v_cache, slot_mapping);
}

Tensor paged_attn(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                  const Tensor& cache_seqlens, double scale) {
  using Fn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double);
  PLM_CPU_KERNEL_CALL(paged_attn, Fn, q, k_cache, v_cache, block_table, cache_seqlens, scale);
}

Tensor swiglu_fwd(const Tensor& gate, const Tensor& up) {
  using Fn = Tensor(const Tensor&, const Tensor&);
  PLM_CPU_KERNEL_CALL(swiglu_fwd, Fn, gate, up);
}

Tensor gelu_fwd(const Tensor& x, const std::string& approximate) {
  using Fn = Tensor(const Tensor&, const std::string&);
  PLM_CPU_KERNEL_CALL(gelu_fwd, Fn, x, approximate);
}

Tensor softmax_fwd(const Tensor& x, double scale, bool causal) {
  using Fn = Tensor(const Tensor&, double, bool);
  PLM_CPU_KERNEL_CALL(softmax_fwd, Fn, x, scale, causal);
}

#undef PLM_CPU_KERNEL_CALL

}  // namespace cpu_kernels
}  // namespace plm_engine
