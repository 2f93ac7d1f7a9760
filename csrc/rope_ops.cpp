// The RoPE family's schemas and the argument checks its CPU and CUDA entry points share (contract in
// rope.h).
#include <torch/library.h>

#include "common/checks.h"
#include "rope.h"

namespace plm_engine {

void check_rope_args(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                     const std::optional<Tensor>& positions) {
  PLM_CHECK_DIM(q, 4);
  PLM_CHECK_DIM(k, 4);
  PLM_CHECK_FLOAT(q);
  PLM_CHECK_SAME_DTYPE(k, q);
  PLM_CHECK_SAME_DEVICE(k, q);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have q's (batch, seqlen, *, head_dim); q has shape ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "q and k must be contiguous in their last dim, got strides ",
              q.strides(), " and ", k.strides());
  PLM_CHECK_DIM(cos, 2);
  PLM_CHECK_SHAPE(sin, cos);
  PLM_CHECK_SAME_DTYPE(sin, cos);
  PLM_CHECK_SAME_DEVICE(cos, q);
  PLM_CHECK_SAME_DEVICE(sin, q);
  TORCH_CHECK(cos.strides() == sin.strides(), "cos and sin must have the same strides, got ", cos.strides(),
              " and ", sin.strides());
  TORCH_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type(),
              "cos/sin must be float32 or q's dtype (", q.scalar_type(), "), got ", cos.scalar_type());
  TORCH_CHECK(2 * cos.size(1) <= q.size(3), "cos/sin have ", cos.size(1), " columns, so rotary_dim ",
              2 * cos.size(1), " exceeds head_dim ", q.size(3));
  if (positions.has_value()) {
    const Tensor& p = *positions;
    TORCH_CHECK(p.scalar_type() == at::kLong, "positions must be int64, got ", p.scalar_type());
    TORCH_CHECK(p.dim() == 2 && p.size(0) == q.size(0) && p.size(1) == q.size(1),
                "positions must have shape (batch, seqlen) = (", q.size(0), ", ", q.size(1), "), got ", p.sizes());
    PLM_CHECK_CONTIGUOUS(p);
    PLM_CHECK_SAME_DEVICE(p, q);
  } else {
    TORCH_CHECK(q.size(1) <= cos.size(0), "cos/sin have ", cos.size(0), " positions but seqlen is ", q.size(1));
  }
}

}  // namespace plm_engine

TORCH_LIBRARY_FRAGMENT(plm_engine, m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved, bool conjugate)"
        " -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved,"
        " bool conjugate) -> ()");
}
