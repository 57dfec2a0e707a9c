// See gemm_backward.h. Per layer t = L .. 1, with K = F*D and W_t the (K x K) block-upper-
// triangular matrix of the forward (block (i, j) = p[t-1, i, j], zero for i > j):
//   alpha = delta^t * h0;  dh0 += delta^t * a^t;  dW_t = h^{t-1}^T alpha (masked);
//   delta^{t-1} = G[t-1] (broadcast over d) + alpha W_t^T;   finally dh0 += delta^0.
// The products skip the zero triangle in blocks of kBlockFields fields: the columns of fields
// [j0, j1) of dW need the rows of fields < j1 only, and the rows of fields [i0, i1) of delta the
// columns of fields >= i0 only (at F = 39: 61% of the full products' work).
// Sums in the op-math type (float for float16 / bfloat16).
#include "gemm_backward.h"

#include <ATen/OpMathType.h>

#include <algorithm>

namespace dagfm {

namespace {
constexpr int64_t kBlockFields = 8;
}  // namespace

std::tuple<at::Tensor, at::Tensor> kernel_backward_gemm(const at::Tensor& grad_states,
                                                        const PropagateArgs& args,
                                                        const at::Tensor& messages,
                                                        const at::Tensor& grad_sum) {
  TORCH_CHECK(args.interaction == Interaction::Kernel, "kernel_backward_gemm: kernel interaction only");
  const int64_t B = args.batch, F = args.num_fields, D = args.embed_dim, L = args.depth, K = F * D;
  const at::ScalarType acc = at::toOpMathType(args.h0.scalar_type());
  const at::TensorOptions opts = args.h0.options().dtype(acc);
  const at::Tensor h0 = args.h0.reshape({B, K}).to(acc);
  const at::Tensor msg = messages.view({B, L, K}).to(acc);
  const at::Tensor G = grad_states.to(acc);
  // where(), not a product with the mask: the lower triangle of p may hold anything (NaN too).
  const at::Tensor upper = at::ones({F, F}, opts.dtype(at::kBool)).triu().view({F, F, 1, 1});
  const at::Tensor zero = at::zeros({}, opts);
  // G[:, t] broadcast over d (plus dLoss/dz when given), in a fresh tensor (it is added to in
  // place; a reshape of the expanded view could alias G itself when D = 1).
  const at::Tensor gsum = grad_sum.defined() ? grad_sum.reshape({B, F, D}).to(acc) : at::Tensor();
  auto broadcast = [&](int64_t t) {
    at::Tensor out = at::empty({B, K}, opts);
    out.view({B, F, D}).copy_(G.select(1, t).unsqueeze(2).expand({B, F, D}));
    if (gsum.defined()) out.view({B, F, D}).add_(gsum);
    return out;
  };
  at::Tensor delta = broadcast(L);
  at::Tensor grad_h0 = at::zeros({B, K}, opts);
  at::Tensor grad_p = at::zeros(args.p.sizes(), args.p.options());
  for (int64_t t = L; t >= 1; --t) {
    const at::Tensor a_t = msg.select(1, t - 1);
    const at::Tensor alpha = delta * h0;
    grad_h0.addcmul_(delta, a_t);
    const at::Tensor hprev = t >= 2 ? h0 * msg.select(1, t - 2) : h0;
    const at::Tensor p_t = at::where(upper, args.p.select(0, t - 1).to(acc), zero);  // (F, F, D, D)
    const at::Tensor w = p_t.permute({0, 2, 1, 3}).reshape({K, K});  // [(i, d), (j, e)]
    at::Tensor delta_prev = broadcast(t - 1);
    for (int64_t f0 = 0; f0 < F; f0 += kBlockFields) {
      const int64_t f1 = std::min(F, f0 + kBlockFields);
      // dW columns of fields [f0, f1): rows of fields < f1.
      const at::Tensor dw = at::mm(hprev.narrow(1, 0, f1 * D).t(), alpha.narrow(1, f0 * D, (f1 - f0) * D));
      grad_p.select(0, t - 1)
          .narrow(0, 0, f1)
          .narrow(1, f0, f1 - f0)
          .copy_(at::where(upper.narrow(0, 0, f1).narrow(1, f0, f1 - f0),
                           dw.view({f1, D, f1 - f0, D}).permute({0, 2, 1, 3}), zero));
      // delta rows of fields [f0, f1): columns of fields >= f0.
      delta_prev.narrow(1, f0 * D, (f1 - f0) * D)
          .add_(at::mm(alpha.narrow(1, f0 * D, K - f0 * D),
                       w.narrow(0, f0 * D, (f1 - f0) * D).narrow(1, f0 * D, K - f0 * D).t()));
    }
    delta = delta_prev;
  }
  grad_h0.add_(delta);
  return {grad_h0.view({B, F, D}).to(args.h0.scalar_type()), grad_p};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> outer_backward_gemm(const at::Tensor& grad_states,
                                                                   const PropagateArgs& args,
                                                                   const at::Tensor& messages,
                                                                   const at::Tensor& grad_sum) {
  TORCH_CHECK(args.interaction == Interaction::Outer, "outer_backward_gemm: outer interaction only");
  const int64_t F = args.num_fields;
  const at::ScalarType acc = at::toOpMathType(args.h0.scalar_type());
  const at::TensorOptions opts = args.p.options().dtype(acc);
  // Lower triangles zeroed first: they may hold anything, and 0 * NaN would leak into the sums.
  const at::Tensor upper = at::ones({F, F}, opts.dtype(at::kBool)).triu().view({1, F, F, 1});
  const at::Tensor zero = at::zeros({}, opts);
  const at::Tensor p = at::where(upper, args.p.to(acc), zero);  // (L, F, F, D)
  const at::Tensor q = at::where(upper, args.q.to(acc), zero);
  PropagateArgs kernel_args = args;
  kernel_args.interaction = Interaction::Kernel;
  kernel_args.p = (p.unsqueeze(-1) * q.unsqueeze(-2)).contiguous();  // (L, F, F, D, D)
  kernel_args.q = at::Tensor();
  auto [grad_h0, grad_w] = kernel_backward_gemm(grad_states, kernel_args, messages, grad_sum);
  const at::Tensor grad_p = (grad_w * q.unsqueeze(-2)).sum(-1).to(args.p.scalar_type());
  const at::Tensor grad_q = (grad_w * p.unsqueeze(-1)).sum(-2).to(args.q.scalar_type());
  return {grad_h0, grad_p, grad_q};
}

}  // namespace dagfm
