// See gemm_backward.h. Per layer t = L .. 1, with K = F*D and W_t the (K x K) block-upper-
// triangular matrix of the forward (block (i, j) = p[t-1, i, j], zero for i > j):
//   alpha = delta^t * h0;  dh0 += delta^t * a^t;  dW_t = h^{t-1}^T alpha (masked);
//   delta^{t-1} = G[t-1] (broadcast over d) + alpha W_t^T;   finally dh0 += delta^0.
// Sums in the op-math type (float for float16 / bfloat16).
#include "gemm_backward.h"

#include <ATen/OpMathType.h>

namespace dagfm {

std::tuple<at::Tensor, at::Tensor> kernel_backward_gemm(const at::Tensor& grad_states,
                                                        const PropagateArgs& args,
                                                        const at::Tensor& messages) {
  TORCH_CHECK(args.interaction == Interaction::Kernel, "kernel_backward_gemm: kernel interaction only");
  const int64_t B = args.batch, F = args.num_fields, D = args.embed_dim, L = args.depth, K = F * D;
  const at::ScalarType acc = at::toOpMathType(args.h0.scalar_type());
  const at::TensorOptions opts = args.h0.options().dtype(acc);
  const at::Tensor h0 = args.h0.reshape({B, K}).to(acc);
  const at::Tensor msg = messages.view({B, L, K}).to(acc);
  const at::Tensor G = grad_states.to(acc);
  // where(), not a product with the mask: the lower triangle of p may hold anything (NaN too).
  const at::Tensor upper =
      at::ones({F, F}, opts.dtype(at::kBool)).triu().view({F, F, 1, 1});
  const at::Tensor zero = at::zeros({}, opts);
  auto broadcast = [&](int64_t t) {
    return G.select(1, t).unsqueeze(2).expand({B, F, D}).reshape({B, K});
  };
  at::Tensor delta = broadcast(L);
  at::Tensor grad_h0 = at::zeros({B, K}, opts);
  at::Tensor grad_p = at::empty(args.p.sizes(), args.p.options());
  for (int64_t t = L; t >= 1; --t) {
    const at::Tensor a_t = msg.select(1, t - 1);
    const at::Tensor alpha = delta * h0;
    grad_h0.addcmul_(delta, a_t);
    const at::Tensor hprev = t >= 2 ? h0 * msg.select(1, t - 2) : h0;
    const at::Tensor w = at::where(upper, args.p.select(0, t - 1).to(acc), zero)
                             .permute({0, 2, 1, 3})
                             .reshape({K, K});  // [(i, d), (j, e)]
    const at::Tensor dw = at::mm(hprev.t(), alpha).view({F, D, F, D}).permute({0, 2, 1, 3});
    grad_p.select(0, t - 1).copy_(at::where(upper, dw, zero));
    delta = broadcast(t - 1) + at::mm(alpha, w.t());
  }
  grad_h0.add_(delta);
  return {grad_h0.view({B, F, D}).to(args.h0.scalar_type()), grad_p};
}

}  // namespace dagfm
