// The whole-model decode step on the CPU in C++: embedding -> every layer -> final norm -> lm_head,
// calling the same CPU kernels the eager forward runs (kernels.h), with no Python between them.
//
// Eager, a batch-1 decode step of a small model spends about half its time in Python: ~15 op calls per
// layer, each validating its arguments, choosing a backend and going through the dispatcher. Here all
// of that happens once: the plan (DecodeStep) is built once per (model, KV cache) and holds the weights
// (the model's own tensors, no copies), the shape and the RoPE tables, checked once; step() then checks
// only its five input tensors and runs the kernels in the order of Transformer._forward_tokens:
//
//   x = tok_embed[ids] (+ pos_embed[positions], gpt2)
//   per layer: n, r = norm(x [+ r]); qkv = n @ Wqkv (+b); rope_(q, k) (llama); write_kv_cache(k, v);
//              o = paged_attn(q); a = o @ Wo (+b); n, r = norm(a + r); x = act(n @ Wup (+b)) @ Wdown (+b)
//   logits = norm(x + r) @ lm_head
//
// Two pre-norm families: "llama" (RMSNorm, RoPE from the model's own cos/sin tables, GQA, SwiGLU,
// optional biases as Qwen2's qkv) and "gpt2" (LayerNorm, learned positions, GELU, biases). Each linear
// layer takes the C++ kernel or at::linear exactly as plm_engine.ops.linear decides: the kernel up to
// linear_max_rows[current ISA] rows (its KERNEL_MAX_ROWS, passed in), at::linear beyond. So the logits
// are the eager step's, bit for bit (tests/generation/test_native_decode.py).
// A weight kept in GGUF blocks (QuantLinear / QuantEmbedding, a uint8 tensor with its ggml type in
// `qtypes`) goes through linear_q_fwd as the eager QuantLinear does; a quantized embedding looks its
// rows up as blocks and decodes them as identity @ rows^T through the same kernel (exact: one nonzero
// product per output).
#include "cpu/decode_step.h"

#include <ATen/record_function.h>
#include <pybind11/stl.h>

#include <cmath>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "linear.h"

namespace plm_engine {
namespace {

using at::Tensor;
namespace k = cpu_kernels;

// A view of `base` (sizes and strides in elements, `offset` elements in), made without the dispatcher.
// A step takes ~14 views per layer (q, k, v out of the fused projection, the kernels' 4-d shapes, the
// SwiGLU halves); as narrow/view/unsqueeze each is a dispatcher call and, under torch.profiler, an event
// of its own, together about as long as a layer's small kernels. The bases are the step's own fresh
// buffers and nothing here records autograd, so a plain alias of the storage is all a view needs.
Tensor alias(const Tensor& base, int64_t offset, at::IntArrayRef sizes, at::IntArrayRef strides) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(), base.dtype());
  impl->set_sizes_and_strides(sizes, strides, base.storage_offset() + offset);
  return Tensor(std::move(impl));
}

struct Layer {
  Tensor attn_norm_w, mlp_norm_w, qkv_w, out_w, up_w, down_w;
  std::optional<Tensor> attn_norm_b, mlp_norm_b, qkv_b, out_b, up_b, down_b;
  Tensor k_cache, v_cache;
  int64_t qkv_q = -1, out_q = -1, up_q = -1, down_q = -1;  // ggml type of a weight in blocks; -1: plain
};

class DecodeStep {
 public:
  // weights: tok_embed, final_norm.weight, lm_head; pos_embed and final_norm.bias for gpt2.
  // layer_weights: per layer, lists of n_layers tensors: attn_norm.weight, qkv.weight, out.weight,
  //   mlp_norm.weight, up.weight, down.weight, and the biases the model has (attn_norm.bias, qkv.bias,
  //   out.bias, mlp_norm.bias, up.bias, down.bias; all or none per name).
  // rope_cos, rope_sin: fp32 (max_positions, head_dim / 2) for llama, None for gpt2.
  // linear_max_rows: the C++ linear kernel's row limit per ISA (cpu::Isa order: generic, avx2, avx512,
  //   avx512_bf16) for the model's dtype; 0: at::linear always.
  // qtypes: the ggml type of each weight kept in GGUF blocks (uint8 rows): "tok_embed" and "lm_head"
  //   one value, "qkv.weight", "out.weight", "up.weight", "down.weight" one per layer (-1: plain).
  DecodeStep(const std::string& arch, const std::string& activation, std::map<std::string, Tensor> weights,
             std::map<std::string, std::vector<Tensor>> layer_weights, std::vector<Tensor> k_cache,
             std::vector<Tensor> v_cache, std::optional<Tensor> rope_cos, std::optional<Tensor> rope_sin,
             int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps, std::vector<int64_t> linear_max_rows,
             std::map<std::string, std::vector<int64_t>> qtypes)
      : is_llama_(arch == "llama"),
        activation_(activation),
        n_heads_(n_heads),
        n_kv_heads_(n_kv_heads),
        head_dim_(head_dim),
        eps_(eps),
        linear_max_rows_(std::move(linear_max_rows)) {
    TORCH_CHECK(arch == "llama" || arch == "gpt2", "DecodeStep: arch must be 'llama' or 'gpt2', got '", arch, "'");
    TORCH_CHECK(activation == "swiglu" || activation == "gelu" || activation == "gelu_tanh",
                "DecodeStep: activation must be swiglu, gelu or gelu_tanh, got '", activation, "'");
    TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "DecodeStep: bad head layout: ", n_heads, " heads, ", n_kv_heads, " kv heads of ", head_dim);
    TORCH_CHECK(eps >= 0, "DecodeStep: eps must be >= 0, got ", eps);
    TORCH_CHECK(linear_max_rows_.size() == 4, "DecodeStep: linear_max_rows needs 4 entries (one per ISA)");
    const size_t n_layers = k_cache.size();
    TORCH_CHECK(n_layers > 0 && v_cache.size() == n_layers, "DecodeStep: need one k and v cache per layer");
    // The model's dtype is its KV cache's (every cache and weight is checked against it below).
    dtype_ = k_cache[0].scalar_type();
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kHalf || dtype_ == at::kBFloat16,
                "DecodeStep: the model must be float32, float16 or bfloat16, got ", dtype_);
    auto qtype_of = [&](const char* name, size_t count) -> std::vector<int64_t> {
      auto it = qtypes.find(name);
      if (it == qtypes.end()) return std::vector<int64_t>(count, -1);
      std::vector<int64_t> out = std::move(it->second);
      qtypes.erase(it);
      TORCH_CHECK(out.size() == count, "DecodeStep: qtypes '", name, "' has ", out.size(), " entries for ", count);
      for (int64_t q : out) TORCH_CHECK(q == -1 || q_block(q).values > 0, "DecodeStep: unsupported GGUF type ", q);
      return out;
    };
    tok_q_ = qtype_of("tok_embed", 1)[0];
    head_q_ = qtype_of("lm_head", 1)[0];
    tok_embed_ = take(weights, "tok_embed", true);
    final_norm_w_ = take(weights, "final_norm.weight", true);
    TORCH_CHECK(final_norm_w_.dim() == 1, "DecodeStep: final_norm.weight must be (hidden,)");
    hidden_ = final_norm_w_.size(0);
    matrix(tok_embed_, -1, hidden_, "tok_embed", tok_q_);
    if (tok_q_ >= 0) eye_ = at::eye(hidden_, at::TensorOptions().dtype(dtype_));
    final_norm_b_ = opt(take(weights, "final_norm.bias", !is_llama_));
    lm_head_ = take(weights, "lm_head", true);
    vector_like(final_norm_w_, "final_norm.weight", true);
    if (final_norm_b_) vector_like(*final_norm_b_, "final_norm.bias", true);
    matrix(lm_head_, -1, hidden_, "lm_head", head_q_);
    if (!is_llama_) {
      pos_embed_ = take(weights, "pos_embed", true);
      matrix(pos_embed_, -1, hidden_, "pos_embed", -1);
    }
    TORCH_CHECK(weights.empty(), "DecodeStep: unknown weight '", weights.begin()->first, "'");

    const int64_t q_width = n_heads * head_dim, kv_width = n_kv_heads * head_dim;
    auto per_layer = [&](const char* name, bool required) -> std::vector<Tensor> {
      auto it = layer_weights.find(name);
      if (it == layer_weights.end()) {
        TORCH_CHECK(!required, "DecodeStep: missing layer weights '", name, "'");
        return {};
      }
      std::vector<Tensor> out = std::move(it->second);
      layer_weights.erase(it);
      TORCH_CHECK(out.size() == n_layers, "DecodeStep: '", name, "' has ", out.size(), " tensors for ", n_layers,
                  " layers");
      return out;
    };
    auto attn_norm_w = per_layer("attn_norm.weight", true), qkv_w = per_layer("qkv.weight", true);
    auto out_w = per_layer("out.weight", true), mlp_norm_w = per_layer("mlp_norm.weight", true);
    auto up_w = per_layer("up.weight", true), down_w = per_layer("down.weight", true);
    auto attn_norm_b = per_layer("attn_norm.bias", !is_llama_), mlp_norm_b = per_layer("mlp_norm.bias", !is_llama_);
    auto qkv_b = per_layer("qkv.bias", false), out_b = per_layer("out.bias", false);
    auto up_b = per_layer("up.bias", false), down_b = per_layer("down.bias", false);
    TORCH_CHECK(layer_weights.empty(), "DecodeStep: unknown layer weights '", layer_weights.begin()->first, "'");
    const auto qkv_q = qtype_of("qkv.weight", n_layers), out_q = qtype_of("out.weight", n_layers);
    const auto up_q = qtype_of("up.weight", n_layers), down_q = qtype_of("down.weight", n_layers);
    TORCH_CHECK(qtypes.empty(), "DecodeStep: unknown qtypes entry '", qtypes.begin()->first, "'");
    TORCH_CHECK(!is_llama_ || (attn_norm_b.empty() && mlp_norm_b.empty()), "DecodeStep: RMSNorm has no bias");

    const auto pick = [](std::vector<Tensor>& v, size_t i) { return v.empty() ? std::nullopt : opt(v[i]); };
    for (size_t i = 0; i < n_layers; ++i) {
      Layer L{attn_norm_w[i], mlp_norm_w[i], qkv_w[i], out_w[i], up_w[i], down_w[i],
              pick(attn_norm_b, i), pick(mlp_norm_b, i), pick(qkv_b, i), pick(out_b, i), pick(up_b, i),
              pick(down_b, i), k_cache[i], v_cache[i], qkv_q[i], out_q[i], up_q[i], down_q[i]};
      vector_like(L.attn_norm_w, "attn_norm.weight", true);
      vector_like(L.mlp_norm_w, "mlp_norm.weight", true);
      if (L.attn_norm_b) vector_like(*L.attn_norm_b, "attn_norm.bias", true);
      if (L.mlp_norm_b) vector_like(*L.mlp_norm_b, "mlp_norm.bias", true);
      matrix(L.qkv_w, q_width + 2 * kv_width, hidden_, "qkv.weight", L.qkv_q);
      matrix(L.out_w, hidden_, q_width, "out.weight", L.out_q);
      matrix(L.up_w, -1, hidden_, "up.weight", L.up_q);
      const int64_t inter = activation == "swiglu" ? L.up_w.size(0) / 2 : L.up_w.size(0);
      TORCH_CHECK(activation != "swiglu" || L.up_w.size(0) % 2 == 0, "DecodeStep: up.weight of SwiGLU needs 2 x inter rows");
      matrix(L.down_w, hidden_, inter, "down.weight", L.down_q);
      bias(L.qkv_b, L.qkv_w, "qkv.bias");
      bias(L.out_b, L.out_w, "out.bias");
      bias(L.up_b, L.up_w, "up.bias");
      bias(L.down_b, L.down_w, "down.bias");
      for (const Tensor* c : {&L.k_cache, &L.v_cache}) {
        TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == dtype_ && c->dim() == 4 && c->is_contiguous() &&
                        c->size(2) == n_kv_heads && c->size(3) == head_dim && c->sizes() == L.k_cache.sizes(),
                    "DecodeStep: layer ", i, "'s KV cache must be contiguous (blocks, block_size, ", n_kv_heads,
                    ", ", head_dim, ") ", dtype_, " on the CPU, got ", c->scalar_type(), " ", c->sizes());
      }
      layers_.push_back(std::move(L));
    }
    if (is_llama_) {
      TORCH_CHECK(rope_cos && rope_sin, "DecodeStep: llama needs its RoPE tables");
      for (const Tensor* t : {&*rope_cos, &*rope_sin}) {
        TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 &&
                        t->size(1) == head_dim / 2 && t->is_contiguous() && t->sizes() == rope_cos->sizes(),
                    "DecodeStep: RoPE tables must be contiguous fp32 (positions, ", head_dim / 2, ") on the CPU");
      }
      cos_ = *rope_cos;
      sin_ = *rope_sin;
    }
    scale_ = std::pow(static_cast<double>(head_dim), -0.5);  // ops.attention's default: head_dim ** -0.5
  }

  // Logits (n, vocab) of one decode step of n sequences, one new token each: input_ids, positions and
  // slot_mapping int64 (n,), block_table int32 (n, max_blocks), cache_seqlens int32 (n,), all on the CPU.
  // Token ids, positions, slots and block ids are checked by the kernels that read them.
  Tensor step(const Tensor& input_ids, const Tensor& positions, const Tensor& slot_mapping,
              const Tensor& block_table, const Tensor& cache_seqlens) const {
    RECORD_FUNCTION("plm_engine.native_decode_step", c10::ArrayRef<const c10::IValue>{});
    const int64_t n = input_ids.dim() == 1 ? input_ids.size(0) : -1;
    step_arg(input_ids, "input_ids", at::kLong, {n});
    TORCH_CHECK(n > 0, "DecodeStep.step: input_ids must be a non-empty 1-D tensor, got ", input_ids.sizes());
    step_arg(positions, "positions", at::kLong, {n});
    step_arg(slot_mapping, "slot_mapping", at::kLong, {n});
    step_arg(cache_seqlens, "cache_seqlens", at::kInt, {n});
    step_arg(block_table, "block_table", at::kInt, {n, block_table.dim() == 2 ? block_table.size(1) : -1});
    TORCH_CHECK(block_table.size(1) > 0, "DecodeStep.step: block_table needs at least one column");

    // The weights are parameters that require grad: nothing of this step may enter an autograd graph.
    at::NoGradGuard no_grad;
    const int64_t max_rows = linear_max_rows_[static_cast<int>(cpu::cpu_isa())];
    const int64_t h = n_heads_, kvh = n_kv_heads_, d = head_dim_;
    const std::optional<Tensor> positions_2d = positions.view({1, n});

    Tensor x = tok_q_ < 0 ? at::embedding(tok_embed_, input_ids)
                          : k::linear_q_fwd(eye_, tok_embed_.index_select(0, input_ids), tok_q_, std::nullopt).t().contiguous();
    if (!is_llama_) x = x + at::embedding(pos_embed_, positions);
    Tensor residual;  // the residual stream; before the first layer, x itself
    for (const Layer& L : layers_) {
      Tensor normed;
      if (!residual.defined()) {
        normed = std::get<0>(k::norm_fwd(x, L.attn_norm_w, L.attn_norm_b, std::nullopt, eps_, is_llama_));
        residual = x;
      } else {
        std::tie(normed, residual, std::ignore, std::ignore) =
            k::norm_fwd(x, L.attn_norm_w, L.attn_norm_b, residual, eps_, is_llama_);
      }
      // q, k, v: views of the fused projection (n, (h + 2 kvh) d), as layers/attention.py splits it.
      Tensor qkv = linear(normed, L.qkv_w, L.qkv_q, L.qkv_b, max_rows);
      const int64_t w = qkv.size(1);
      Tensor kk = alias(qkv, h * d, {n, kvh, d}, {w, d, 1});
      Tensor v = alias(qkv, (h + kvh) * d, {n, kvh, d}, {w, d, 1});
      if (is_llama_) {  // the kernel's (batch = 1, seqlen = n, heads, d)
        Tensor q4 = alias(qkv, 0, {1, n, h, d}, {n * w, w, d, 1});
        Tensor k4 = alias(qkv, h * d, {1, n, kvh, d}, {n * w, w, d, 1});
        k::rope_(q4, k4, cos_, sin_, positions_2d, false, false);
      }
      k::write_kv_cache(kk, v, L.k_cache, L.v_cache, slot_mapping);
      // q as (n, 1, h, d): one new token per sequence; o comes back contiguous in that shape.
      Tensor o = k::paged_attn(alias(qkv, 0, {n, 1, h, d}, {w, w, d, 1}), L.k_cache, L.v_cache, block_table,
                               cache_seqlens, scale_);
      Tensor attn = linear(alias(o, 0, {n, h * d}, {h * d, 1}), L.out_w, L.out_q, L.out_b, max_rows);
      std::tie(normed, residual, std::ignore, std::ignore) =
          k::norm_fwd(attn, L.mlp_norm_w, L.mlp_norm_b, residual, eps_, is_llama_);
      Tensor up = linear(normed, L.up_w, L.up_q, L.up_b, max_rows);
      Tensor act;
      if (activation_ == "swiglu") {
        const int64_t inter = up.size(1) / 2;
        act = k::swiglu_fwd(alias(up, 0, {n, inter}, {2 * inter, 1}), alias(up, inter, {n, inter}, {2 * inter, 1}));
      } else {
        act = k::gelu_fwd(up, activation_ == "gelu_tanh" ? "tanh" : "none");
      }
      x = linear(act, L.down_w, L.down_q, L.down_b, max_rows);
    }
    Tensor final = std::get<0>(k::norm_fwd(x, final_norm_w_, final_norm_b_, residual, eps_, is_llama_));
    return linear(final, lm_head_, head_q_, std::nullopt, max_rows);
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  static std::optional<Tensor> opt(const Tensor& t) {
    return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
  }

  static Tensor take(std::map<std::string, Tensor>& weights, const char* name, bool required) {
    auto it = weights.find(name);
    if (it == weights.end()) {
      TORCH_CHECK(!required, "DecodeStep: missing weight '", name, "'");
      return Tensor();
    }
    Tensor t = it->second;
    weights.erase(it);
    return t;
  }

  // "float32 (2, 3) on cpu", or "none": what an error message reports of a tensor argument.
  static std::string describe(const Tensor& t) {
    if (!t.defined()) return "none";
    std::ostringstream s;
    s << t.scalar_type() << " " << t.sizes() << " on " << t.device() << (t.is_contiguous() ? "" : " (strided)");
    return s.str();
  }

  // Every weight: contiguous, on the CPU, in the model's dtype (norm weights may be fp32: master weights).
  void weight(const Tensor& t, const char* name, bool fp32_ok) const {
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous() &&
                    (t.scalar_type() == dtype_ || (fp32_ok && t.scalar_type() == at::kFloat)),
                "DecodeStep: ", name, " must be a contiguous ", dtype_, " tensor on the CPU, got ", describe(t));
  }

  void vector_like(const Tensor& t, const char* name, bool fp32_ok) const {
    weight(t, name, fp32_ok);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == hidden_, "DecodeStep: ", name, " must be (", hidden_, ",), got ",
                t.sizes());
  }

  // (rows, cols) values; -1 accepts any size. A weight in GGUF blocks (qtype >= 0) is (rows, cols / block
  // values * block bytes) uint8.
  void matrix(const Tensor& t, int64_t rows, int64_t cols, const char* name, int64_t qtype) const {
    int64_t width = cols;
    if (qtype >= 0) {
      const QBlock b = q_block(qtype);
      TORCH_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kByte,
                  "DecodeStep: ", name, " in GGUF blocks must be a contiguous uint8 tensor on the CPU, got ",
                  describe(t));
      TORCH_CHECK(cols > 0 && cols % b.values == 0, "DecodeStep: ", name, " has ", cols, " columns, not a multiple of ",
                  b.values);
      width = cols / b.values * b.bytes;
    } else {
      weight(t, name, false);
    }
    TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && (width < 0 || t.size(1) == width) &&
                    t.size(0) > 0 && t.size(1) > 0,
                "DecodeStep: ", name, " must be (", rows, ", ", width, "), got ", t.sizes());
  }

  void bias(const std::optional<Tensor>& b, const Tensor& w, const char* name) const {
    if (!b) return;
    weight(*b, name, false);
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "DecodeStep: ", name, " must be (", w.size(0),
                ",), got ", b->sizes());
  }

  static void step_arg(const Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape &&
                    t.is_contiguous(),
                "DecodeStep.step: ", name, " must be a contiguous ", dtype, " tensor ", at::IntArrayRef(shape),
                " on the CPU, got ", describe(t));
  }

  // plm_engine.ops.linear's choice: the C++ kernel for 1..max_rows rows, at::linear (F.linear) beyond; a
  // weight in blocks always takes linear_q_fwd, as QuantLinear does.
  static Tensor linear(const Tensor& x, const Tensor& w, int64_t qtype, const std::optional<Tensor>& b,
                       int64_t max_rows) {
    if (qtype >= 0) return k::linear_q_fwd(x, w, qtype, b);
    if (x.size(0) <= max_rows) return k::linear_fwd(x, w, b);
    return at::linear(x, w, b);
  }

  bool is_llama_;
  std::string activation_;
  int64_t n_heads_, n_kv_heads_, head_dim_, hidden_ = 0;
  double eps_, scale_ = 1.0;
  std::vector<int64_t> linear_max_rows_;
  at::ScalarType dtype_ = at::kFloat;
  Tensor tok_embed_, pos_embed_, final_norm_w_, lm_head_, cos_, sin_, eye_;
  int64_t tok_q_ = -1, head_q_ = -1;
  std::optional<Tensor> final_norm_b_;
  std::vector<Layer> layers_;
};

}  // namespace

void bind_decode_step(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<DecodeStep>(m, "DecodeStep",
                         "A decoder-only Transformer's decode step as one C++ call "
                         "(plm_engine/generation/native_decode.py builds it)")
      .def(py::init<const std::string&, const std::string&, std::map<std::string, Tensor>,
                    std::map<std::string, std::vector<Tensor>>, std::vector<Tensor>, std::vector<Tensor>,
                    std::optional<Tensor>, std::optional<Tensor>, int64_t, int64_t, int64_t, double,
                    std::vector<int64_t>, std::map<std::string, std::vector<int64_t>>>(),
           py::arg("arch"), py::arg("activation"), py::arg("weights"), py::arg("layer_weights"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("rope_cos"), py::arg("rope_sin"), py::arg("n_heads"), py::arg("n_kv_heads"),
           py::arg("head_dim"), py::arg("eps"), py::arg("linear_max_rows"),
           py::arg("qtypes") = std::map<std::string, std::vector<int64_t>>{})
      // The GIL is released for the step: a server's other threads run while the kernels do.
      .def("step", &DecodeStep::step, py::arg("input_ids"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("block_table"), py::arg("cache_seqlens"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("n_layers", &DecodeStep::n_layers);
}

}  // namespace plm_engine
