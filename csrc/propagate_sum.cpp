// dagfm_ext::propagate_sum_fwd / propagate_sum_fwd_train: the propagation plus the D-vector sum
// z = h^0 + h^1 + ... + h^L (B, F, D) that DAGFM+'s readout reads; the backward is propagate_bwd
// with grad_sum = dLoss/dz.
//
// The CPU tiles accumulate z themselves (cpu/dagfm_cpu.cpp). On CUDA both ops are composed here:
// every h^t (t >= 1) is h0 * a^t and the training forward keeps the messages a^1..a^L, so
// z = h0 + h0 * sum_t a^t is one elementwise pass over what the CUDA forward returns anyway.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "ops.h"

namespace dagfm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_sum_fwd_train(
    const at::Tensor& h0, const at::Tensor& p, const std::optional<at::Tensor>& q,
    c10::string_view interaction) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dagfm_ext::propagate_fwd_train", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&,
                                                    c10::string_view)>();
  const PropagateArgs args =
      check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  auto [states, messages] = forward.call(h0, p, q, interaction);
  // Summed in the op-math type (float for float16 / bfloat16), rounded once.
  const at::ScalarType acc = at::toOpMathType(args.h0.scalar_type());
  const at::Tensor a_sum =
      messages.view({args.batch, args.depth, args.num_fields, args.embed_dim}).to(acc).sum(1);
  const at::Tensor x0 = args.h0.to(acc);
  const at::Tensor z = at::addcmul(x0, x0, a_sum).to(args.h0.scalar_type());  // h0 + h0 * sum_t a^t
  return {states, z, messages};
}

std::tuple<at::Tensor, at::Tensor> propagate_sum_fwd(const at::Tensor& h0, const at::Tensor& p,
                                                     const std::optional<at::Tensor>& q,
                                                     c10::string_view interaction) {
  auto [states, z, messages] = propagate_sum_fwd_train(h0, p, q, interaction);
  return {states, z};
}

}  // namespace
}  // namespace dagfm

TORCH_LIBRARY_FRAGMENT(dagfm_ext, m) {
  // (states, z): states as propagate_fwd, z (B, F, D); no messages kept (inference).
  m.def("propagate_sum_fwd(Tensor h0, Tensor p, Tensor? q, str interaction) -> (Tensor, Tensor)");
  // (states, z, saved): states and saved as propagate_fwd_train; z (B, F, D).
  m.def("propagate_sum_fwd_train(Tensor h0, Tensor p, Tensor? q, str interaction) -> (Tensor, Tensor, Tensor)");
}

// A CPU-only build simply never reaches the CUDA entries.
TORCH_LIBRARY_IMPL(dagfm_ext, CUDA, m) {
  m.impl("propagate_sum_fwd", &dagfm::propagate_sum_fwd);
  m.impl("propagate_sum_fwd_train", &dagfm::propagate_sum_fwd_train);
}
