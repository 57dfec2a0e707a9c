// The field-mixing ops: schemas, argument checks, and the composite form that serves CUDA (no
// dedicated kernel: at::bmm runs on cuBLAS) and the dtypes the CPU kernels do not take.
#include "field_mix_ops.h"

#include <torch/library.h>

namespace dagfm {
namespace {

// Sizes the kernels index with int (and products of them with int64).
constexpr int64_t kMaxMixDim = int64_t(1) << 24;

}  // namespace

FieldMixArgs check_field_mix_args(const at::Tensor& x, const at::Tensor& connect) {
  TORCH_CHECK(x.defined(), "x: expected a tensor, got an undefined tensor");
  TORCH_CHECK(connect.defined(), "connect: expected a tensor, got an undefined tensor");
  TORCH_CHECK(x.dim() == 3, "x: expected a 3-D tensor of shape (B, F, D), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "x: expected a floating dtype (float32, float64, float16 or bfloat16), got ", x.scalar_type());
  const int64_t B = x.size(0), F = x.size(1), D = x.size(2);
  TORCH_CHECK(F >= 1 && D >= 1, "x: expected at least one field and one embedding dim (F >= 1, D >= 1), got shape ",
              x.sizes());
  TORCH_CHECK(F <= kMaxMixDim && D <= kMaxMixDim, "x: F and D up to ", kMaxMixDim, " supported, got shape ",
              x.sizes());
  TORCH_CHECK(connect.scalar_type() == x.scalar_type(), "connect: expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", connect.scalar_type());
  TORCH_CHECK(connect.device() == x.device(), "connect: expected device ", x.device(), " (the device of x), got ",
              connect.device());
  TORCH_CHECK(connect.dim() == 2 && connect.size(0) == F && connect.size(1) == F,
              "connect: expected shape (F, F) = (", F, ", ", F, ") for x of shape ", x.sizes(), ", got shape ",
              connect.sizes());
  FieldMixArgs args;
  args.x = x.contiguous();
  args.connect = connect.contiguous();
  args.batch = B;
  args.num_fields = static_cast<int>(F);
  args.embed_dim = static_cast<int>(D);
  return args;
}

at::Tensor check_field_mix_grad(const at::Tensor& grad, const FieldMixArgs& args) {
  TORCH_CHECK(grad.defined(), "grad: expected a tensor, got an undefined tensor");
  TORCH_CHECK(grad.scalar_type() == args.x.scalar_type(), "grad: expected dtype ", args.x.scalar_type(),
              " (the dtype of x), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == args.x.device(), "grad: expected device ", args.x.device(),
              " (the device of x), got ", grad.device());
  TORCH_CHECK(grad.sizes() == args.x.sizes(), "grad: expected shape (B, F, D) = ", args.x.sizes(),
              " (the shape of x), got ", grad.sizes());
  return grad.contiguous();
}

at::Tensor field_mix_composite(const FieldMixArgs& args) {
  const int64_t F = args.num_fields;
  return at::bmm(args.connect.expand({args.batch, F, F}), args.x);
}

std::tuple<at::Tensor, at::Tensor> field_mix_bwd_composite(const at::Tensor& grad, const FieldMixArgs& args) {
  const int64_t F = args.num_fields;
  at::Tensor grad_x = at::bmm(args.connect.t().expand({args.batch, F, F}), grad);
  // sum_b g[b] x[b]^T as one product over the (b, d) pairs: (F, B*D) times (B*D, F).
  const at::Tensor g2 = grad.permute({1, 0, 2}).reshape({F, -1});
  const at::Tensor x2 = args.x.permute({1, 0, 2}).reshape({F, -1});
  return {grad_x, at::mm(g2, x2.t())};
}

namespace {

at::Tensor field_mix_other(const at::Tensor& x, const at::Tensor& connect) {
  return field_mix_composite(check_field_mix_args(x, connect));
}

std::tuple<at::Tensor, at::Tensor> field_mix_bwd_other(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& connect) {
  const FieldMixArgs args = check_field_mix_args(x, connect);
  return field_mix_bwd_composite(check_field_mix_grad(grad, args), args);
}

}  // namespace
}  // namespace dagfm

TORCH_LIBRARY_FRAGMENT(dagfm_ext, m) {
  // h0[b] = connect @ x[b]: x (B, F, D), connect (F, F) -> (B, F, D).
  m.def("field_mix(Tensor x, Tensor connect) -> Tensor");
  // (grad_x, grad_connect) = (connect^T @ grad[b], sum_b grad[b] @ x[b]^T).
  m.def("field_mix_bwd(Tensor grad, Tensor x, Tensor connect) -> (Tensor, Tensor)");
}

// A CPU-only build simply never reaches the CUDA entries.
TORCH_LIBRARY_IMPL(dagfm_ext, CUDA, m) {
  m.impl("field_mix", &dagfm::field_mix_other);
  m.impl("field_mix_bwd", &dagfm::field_mix_bwd_other);
}
