// The test extension's operators, torch.ops.plm_emu.*: CPU tensors in, the emulated CUDA kernels run
// on their data (emu_<op>.cpp), CPU tensors out. Loaded only by tests/cuda_emu.py. Outputs are NaN-filled
// before a kernel writes them, so an element it misses cannot pass as a right answer.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/write_kv_params.h"
#include "testing/emu_launchers.h"

namespace {

using at::Tensor;
using plm_emu_ops::Dtype;

Dtype dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kF32;
    case at::kHalf: return Dtype::kF16;
    case at::kBFloat16: return Dtype::kBF16;
    case at::kDouble: return Dtype::kF64;
    default: TORCH_CHECK(false, "plm_emu: unsupported dtype ", t.scalar_type());
  }
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "plm_emu: ", name, " must be a CPU tensor");
}

Tensor poisoned(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
  if (at::isFloatingType(opts.dtype().toScalarType())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Runs fn, turning an emulator error (a kernel that broke the CUDA execution model) into a RuntimeError
// that carries its message.
template <typename Fn>
auto guarded(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

const void* ptr_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

// ---- norms ----
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const Tensor& weight,
                                                    const std::optional<Tensor>& bias,
                                                    const std::optional<Tensor>& residual, double eps, bool is_rms,
                                                    int64_t max_blocks) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2, "plm_emu.norm_fwd: x must be (rows, n)");
  const int64_t rows = x.size(0), n = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor y = poisoned(x.sizes(), x.options());
  Tensor h = residual.has_value() ? poisoned(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor mean = poisoned({is_rms ? 0 : rows}, f32);
  Tensor rstd = poisoned({rows}, f32);
  if (rows == 0 || n == 0) return {y, h, mean, rstd};
  guarded([&] {
    plm_emu_ops::norm_fwd(dtype_of(x), dtype_of(weight), x.const_data_ptr(), ptr_or_null(residual),
                          weight.const_data_ptr(), ptr_or_null(bias), y.mutable_data_ptr(),
                          residual.has_value() ? h.mutable_data_ptr() : nullptr,
                          is_rms ? nullptr : mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows, n,
                          static_cast<float>(eps), is_rms, max_blocks);
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy, const std::optional<Tensor>& dh, const Tensor& h,
                                            const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                            bool has_bias, bool is_rms, int64_t bwd_blocks) {
  check_cpu(h, "h");
  const int64_t rows = h.size(0), n = h.size(1);
  Tensor dx = poisoned(h.sizes(), h.options());
  Tensor dw = poisoned({n}, weight.options());
  Tensor db = has_bias ? poisoned({n}, weight.options()) : at::empty({0}, weight.options());
  if (rows == 0 || n == 0) return {dx, dw.zero_(), db.zero_()};
  guarded([&] {
    plm_emu_ops::norm_bwd(dtype_of(h), dtype_of(weight), dy.const_data_ptr(), ptr_or_null(dh), h.const_data_ptr(),
                          weight.const_data_ptr(), is_rms ? nullptr : mean.const_data_ptr<float>(),
                          rstd.const_data_ptr<float>(), dx.mutable_data_ptr(), dw.mutable_data_ptr(),
                          has_bias ? db.mutable_data_ptr() : nullptr, rows, n, is_rms, bwd_blocks);
  });
  return {dx, dw, db};
}

// ---- softmax ---- x: (batch, sq, sk) contiguous
Tensor softmax_fwd(const Tensor& x, double scale, bool causal) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "plm_emu.softmax_fwd: x must be contiguous (batch, sq, sk)");
  Tensor y = poisoned(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  guarded([&] {
    plm_emu_ops::softmax_fwd(dtype_of(x), x.const_data_ptr(), y.mutable_data_ptr(), x.size(0) * x.size(1), x.size(1),
                             x.size(2), static_cast<float>(scale), causal);
  });
  return y;
}

Tensor softmax_bwd(const Tensor& dy, const Tensor& y, double scale) {
  check_cpu(y, "y");
  TORCH_CHECK(y.dim() == 3 && y.is_contiguous() && dy.is_contiguous(), "plm_emu.softmax_bwd: contiguous 3-D");
  Tensor dx = poisoned(y.sizes(), y.options());
  if (dx.numel() == 0) return dx;
  guarded([&] {
    plm_emu_ops::softmax_bwd(dtype_of(y), dy.const_data_ptr(), y.const_data_ptr(), dx.mutable_data_ptr(),
                             y.size(0) * y.size(1), y.size(2), static_cast<float>(scale));
  });
  return dx;
}

// ---- activations ---- every input (rows, n) with unit last stride; outputs (rows, n) contiguous
std::vector<Tensor> activation(const std::string& kind, bool tanh, at::TensorList inputs, int64_t n_out,
                               int64_t max_grid_y) {
  TORCH_CHECK(!inputs.empty() && inputs.size() <= 3 && n_out >= 1 && n_out <= 2, "plm_emu.activation: bad arity");
  const Tensor& first = inputs[0];
  TORCH_CHECK(first.dim() == 2, "plm_emu.activation: inputs must be (rows, n)");
  const void* in[3];
  int64_t strides[3];
  for (size_t j = 0; j < inputs.size(); ++j) {
    check_cpu(inputs[j], "input");
    TORCH_CHECK(inputs[j].sizes() == first.sizes() && inputs[j].stride(1) == 1, "plm_emu.activation: input layout");
    in[j] = inputs[j].const_data_ptr();
    strides[j] = inputs[j].stride(0);
  }
  std::vector<Tensor> outs;
  void* out[2];
  for (int64_t j = 0; j < n_out; ++j) {
    outs.push_back(poisoned(first.sizes(), first.options()));
    out[j] = outs.back().mutable_data_ptr();
  }
  guarded([&] {
    plm_emu_ops::activation(kind.c_str(), tanh, dtype_of(first), in, strides, static_cast<int>(inputs.size()), out,
                            static_cast<int>(n_out), first.size(0), first.size(1), max_grid_y);
  });
  return outs;
}

// ---- rope ---- q: (batch, seqlen, hq, head_dim), k: (batch, seqlen, hk, head_dim), unit last stride;
// cos/sin: (n_pos, half); positions: (batch, seqlen) int64 or None. In place when inplace.
std::tuple<Tensor, Tensor> rope(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                const std::optional<Tensor>& positions, bool interleaved, bool conjugate,
                                bool inplace) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.stride(3) == 1 && k.stride(3) == 1, "plm_emu.rope: q/k layout");
  TORCH_CHECK(cos.dim() == 2 && cos.strides() == sin.strides(), "plm_emu.rope: cos/sin layout");
  Tensor q_out = inplace ? q : poisoned(q.sizes(), q.options());
  Tensor k_out = inplace ? k : poisoned(k.sizes(), k.options());
  Tensor pos;
  if (positions.has_value()) pos = positions->contiguous();
  plm_emu_ops::RopeCall c;
  c.t = dtype_of(q);
  c.c = dtype_of(cos);
  c.q = q.const_data_ptr(), c.k = k.const_data_ptr(), c.cos = cos.const_data_ptr(), c.sin = sin.const_data_ptr();
  c.q_out = q_out.mutable_data_ptr(), c.k_out = k_out.mutable_data_ptr();
  c.positions = positions.has_value() ? pos.const_data_ptr<int64_t>() : nullptr;
  for (int i = 0; i < 4; ++i) {
    c.q_stride[i] = q.stride(i), c.k_stride[i] = k.stride(i);
    c.qo_stride[i] = q_out.stride(i), c.ko_stride[i] = k_out.stride(i);
  }
  c.cos_stride[0] = cos.stride(0), c.cos_stride[1] = cos.stride(1);
  c.batch = q.size(0), c.seqlen = q.size(1), c.n_pos = cos.size(0);
  c.hq = static_cast<int>(q.size(2)), c.hk = static_cast<int>(k.size(2));
  c.half = static_cast<int>(cos.size(1)), c.head_dim = static_cast<int>(q.size(3));
  c.interleaved = interleaved, c.conjugate = conjugate, c.inplace = inplace;
  guarded([&] { plm_emu_ops::rope(c); });
  return {q_out, k_out};
}

std::tuple<Tensor, Tensor> rope_out_of_place(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                              const std::optional<Tensor>& positions, bool interleaved,
                                              bool conjugate) {
  return rope(q, k, cos, sin, positions, interleaved, conjugate, false);
}

void rope_inplace(Tensor q, Tensor k, const Tensor& cos, const Tensor& sin, const std::optional<Tensor>& positions,
                  bool interleaved, bool conjugate) {
  rope(q, k, cos, sin, positions, interleaved, conjugate, true);
}

// ---- paged attention ---- shapes as plm_engine.ops.paged_attention
// bias_rows: PagedParams::bias as a (n_heads, 2 * max_distance + 1) fp32 tensor, or None.
Tensor paged_attn(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                  const Tensor& cache_seqlens, double scale, int64_t num_splits,
                  const std::optional<Tensor>& bias_rows) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.strides() == v_cache.strides() && block_table.scalar_type() == at::kInt &&
                  cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous() &&
                  block_table.stride(1) == 1,
              "plm_emu.paged_attn: layout");
  Tensor out = poisoned(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  plm_emu_ops::PagedCall c;
  c.t = dtype_of(q);
  c.q = q.const_data_ptr(), c.k_cache = k_cache.const_data_ptr(), c.v_cache = v_cache.const_data_ptr();
  c.block_table = block_table.const_data_ptr<int>(), c.cache_seqlens = cache_seqlens.const_data_ptr<int>();
  c.out = out.mutable_data_ptr();
  c.q_stride[0] = q.stride(0), c.q_stride[1] = q.stride(1), c.q_stride[2] = q.stride(2);
  c.cache_stride_block = k_cache.stride(0), c.cache_stride_slot = k_cache.stride(1);
  c.bt_stride = block_table.stride(0);
  c.batch = q.size(0), c.seqlen_q = q.size(1), c.n_heads = q.size(2), c.head_dim = q.size(3);
  c.block_size = k_cache.size(1), c.n_kv_heads = k_cache.size(2);
  c.scale = static_cast<float>(scale);
  c.num_splits = static_cast<int>(num_splits);
  if (bias_rows.has_value()) {
    TORCH_CHECK(bias_rows->scalar_type() == at::kFloat && bias_rows->is_contiguous() && bias_rows->dim() == 2 &&
                    bias_rows->size(0) == q.size(2) && bias_rows->size(1) % 2 == 1,
                "plm_emu.paged_attn: bias_rows must be contiguous fp32 (n_heads, 2 * max_distance + 1)");
    c.bias = bias_rows->const_data_ptr<float>();
    c.max_distance = static_cast<int>((bias_rows->size(1) - 1) / 2);
  }
  guarded([&] { plm_emu_ops::paged_attn(c); });
  return out;
}

// k, v: (n_tokens, n_kv_heads, head_dim), unit last stride; caches (blocks, block_size, n_kv_heads, head_dim).
void write_kv_cache(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping) {
  check_cpu(k, "k");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  slot_mapping.is_contiguous(),
              "plm_emu.write_kv_cache: layout");
  const plm_engine::WriteParams p = plm_engine::write_kv_params(k, v, k_cache, v_cache, slot_mapping);
  guarded([&] { plm_emu_ops::write_kv_cache(dtype_of(k), dtype_of(k_cache), p); });
}

// ---- the emulator's own tests ----
Tensor selftest(const std::string& name, int64_t out_len, int64_t blocks, int64_t threads) {
  Tensor out = at::zeros({out_len}, at::TensorOptions().dtype(at::kInt));
  guarded([&] {
    plm_emu_ops::selftest(name.c_str(), out.mutable_data_ptr<int>(), out_len, static_cast<int>(blocks),
                          static_cast<int>(threads));
  });
  return out;
}

std::string set_order(const std::string& order) {
  return guarded([&] { return std::string(plm_emu_ops::set_order(order.c_str())); });
}

}  // namespace

// Catch-all kernels: plain CPU functions, no autograd or other dispatch keys involved.
TORCH_LIBRARY(plm_emu, m) {
  m.def("norm_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps, bool is_rms, int max_blocks)"
        " -> (Tensor, Tensor, Tensor, Tensor)", &norm_fwd);
  m.def("norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor mean, Tensor rstd, bool has_bias,"
        " bool is_rms, int bwd_blocks) -> (Tensor, Tensor, Tensor)", &norm_bwd);
  m.def("softmax_fwd(Tensor x, float scale, bool causal) -> Tensor", &softmax_fwd);
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale) -> Tensor", &softmax_bwd);
  m.def("activation(str kind, bool tanh, Tensor[] inputs, int n_out, int max_grid_y) -> Tensor[]", &activation);
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved, bool conjugate)"
        " -> (Tensor, Tensor)", &rope_out_of_place);
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved,"
        " bool conjugate) -> ()", &rope_inplace);
  m.def("paged_attn(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor cache_seqlens,"
        " float scale, int num_splits, Tensor? bias_rows=None) -> Tensor", &paged_attn);
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        &write_kv_cache);
  m.def("selftest(str name, int out_len, int blocks, int threads) -> Tensor", &selftest);
  m.def("set_order(str order) -> str", &set_order);
}
