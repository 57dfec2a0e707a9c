// Argument checking and params filling for the dagfm_ext::propagate_* ops: one place for every
// backend. Each backend's TORCH_LIBRARY_IMPL calls check_propagate_args first, then make_params.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

#include "dagfm_params.h"

namespace dagfm {

// Inputs after validation, made contiguous (a non-contiguous input is copied, never misread).
struct PropagateArgs {
  at::Tensor h0;
  at::Tensor p;
  at::Tensor q;  // undefined unless interaction == Outer
  Interaction interaction = Interaction::Inner;
  int64_t batch = 0;
  int num_fields = 0;
  int embed_dim = 0;
  int depth = 0;
};

Interaction parse_interaction(std::string_view name);
const char* interaction_name(Interaction kind);

// Raises a c10::Error (RuntimeError in Python) naming the argument and what was expected.
PropagateArgs check_propagate_args(const at::Tensor& h0, const at::Tensor& p,
                                   const std::optional<at::Tensor>& q, std::string_view interaction);
// Validates grad_states against the forward's arguments; returns it contiguous.
at::Tensor check_grad_states(const at::Tensor& grad_states, const PropagateArgs& args);

// The optional `saved` input of propagate_bwd: the messages a^1..a^L (flat, laid out (B, L, F, D)) that a
// backend's propagate_fwd_train kept instead of having the backward recompute them. Returns an
// undefined tensor for None or an empty tensor, else the validated contiguous tensor.
at::Tensor check_saved_messages(const std::optional<at::Tensor>& saved, const PropagateArgs& args);

// The optional `grad_sum` input of propagate_bwd, dLoss/dz (B, F, D): undefined for None, else the
// validated contiguous tensor.
at::Tensor check_grad_sum(const std::optional<at::Tensor>& grad_sum, const PropagateArgs& args);

// The states' shape (B, L+1, F), and the states allocated with the inputs' options.
std::array<int64_t, 3> states_sizes(const PropagateArgs& args);
at::Tensor empty_states(const PropagateArgs& args);

template <typename T>
PropagateParams<T> make_params(const PropagateArgs& args, at::Tensor& states);

template <typename T>
PropagateBackwardParams<T> make_backward_params(const PropagateArgs& args,
                                                const at::Tensor& grad_states, at::Tensor& grad_h0,
                                                at::Tensor& grad_p, at::Tensor& grad_q);

}  // namespace dagfm
