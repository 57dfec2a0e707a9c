// Operator schemas and the one place where their arguments are checked. No Python here: the
// CMake build links these sources into a plain libtorch library.
#include "ops.h"

#include <torch/library.h>

#include <sstream>
#include <string>

namespace dagfm {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// float32 / float64 everywhere; float16 / bfloat16 on CUDA only (float accumulation there). The CPU
// kernels have no 16-bit path: rather than a silent upcast, a clear error that says where they run.
void check_h0_dtype(const at::Tensor& h0) {
  const auto dt = h0.scalar_type();
  if (dt == at::kFloat || dt == at::kDouble) return;
  const bool half = dt == at::kHalf || dt == at::kBFloat16;
  if (h0.is_cuda()) {
    TORCH_CHECK(half, "h0: expected dtype float32 or float64 (or float16 / bfloat16, supported on CUDA), got ",
                dt);
    return;
  }
  TORCH_CHECK(!half, "h0: expected dtype float32 or float64 on device ", h0.device(), ", got ", dt,
              " (float16 and bfloat16 are supported on CUDA only; use h0.float() on ", h0.device().type(),
              ")");
  TORCH_CHECK(false, "h0: expected dtype float32 or float64 on device ", h0.device(),
              " (float16 / bfloat16 also on CUDA), got ", dt);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& h0) {
  TORCH_CHECK(t.scalar_type() == h0.scalar_type(), name, ": expected dtype ", h0.scalar_type(),
              " (the dtype of h0), got ", t.scalar_type());
  TORCH_CHECK(t.device() == h0.device(), name, ": expected device ", h0.device(),
              " (the device of h0), got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> expected,
                 const char* symbolic) {
  const std::vector<int64_t> want(expected);
  TORCH_CHECK(t.sizes().vec() == want, name, ": expected shape ", symbolic, " = ",
              shape_str(want), ", got ", shape_str(t.sizes()));
}

}  // namespace

Interaction parse_interaction(std::string_view name) {
  if (name == "inner") return Interaction::Inner;
  if (name == "outer") return Interaction::Outer;
  if (name == "kernel") return Interaction::Kernel;
  TORCH_CHECK(false, "interaction: expected one of 'inner', 'outer', 'kernel', got '",
              std::string(name), "'");
}

const char* interaction_name(Interaction kind) {
  switch (kind) {
    case Interaction::Inner: return "inner";
    case Interaction::Outer: return "outer";
    case Interaction::Kernel: return "kernel";
  }
  return "?";
}

PropagateArgs check_propagate_args(const at::Tensor& h0, const at::Tensor& p,
                                   const std::optional<at::Tensor>& q, std::string_view interaction) {
  PropagateArgs args;
  args.interaction = parse_interaction(interaction);
  const bool kernel = args.interaction == Interaction::Kernel;

  TORCH_CHECK(h0.defined(), "h0: expected a tensor, got an undefined tensor");
  TORCH_CHECK(h0.dim() == 3, "h0: expected a 3-D tensor of shape (B, F, D), got shape ",
              shape_str(h0.sizes()));
  check_h0_dtype(h0);
  const int64_t B = h0.size(0), F = h0.size(1), D = h0.size(2);
  TORCH_CHECK(F >= 1 && D >= 1, "h0: expected at least one field and one embedding dim (F >= 1, D >= 1), got shape ",
              shape_str(h0.sizes()));
  TORCH_CHECK(F <= (1 << 16) && D <= (1 << 12), "h0: F up to 65536 and D up to 4096 supported, got shape ",
              shape_str(h0.sizes()));

  TORCH_CHECK(p.defined(), "p: expected a tensor, got an undefined tensor");
  check_like(p, "p", h0);
  const int64_t want_p_dim = kernel ? 5 : 4;
  TORCH_CHECK(p.dim() == want_p_dim, "p: expected a ", want_p_dim, "-D tensor of shape ",
              kernel ? "(L, F, F, D, D)" : "(L, F, F, D)", " for interaction='",
              interaction_name(args.interaction), "', got shape ", shape_str(p.sizes()));
  const int64_t L = p.size(0);
  // The kernels index layers with int; an expanded p can claim any number of layers.
  TORCH_CHECK(L <= (1 << 16), "p: up to 65536 layers (L = p.size(0)) supported, got shape ", shape_str(p.sizes()));
  if (kernel)
    check_shape(p, "p", {L, F, F, D, D}, "(L, F, F, D, D)");
  else
    check_shape(p, "p", {L, F, F, D}, "(L, F, F, D)");

  const bool has_q = q.has_value() && q->defined();
  if (args.interaction == Interaction::Outer) {
    TORCH_CHECK(has_q, "q: expected a tensor of shape (L, F, F, D) = ", shape_str({L, F, F, D}),
                " for interaction='outer', got None");
    check_like(*q, "q", h0);
    check_shape(*q, "q", {L, F, F, D}, "(L, F, F, D)");
    args.q = q->contiguous();
  } else {
    TORCH_CHECK(!has_q, "q: expected None for interaction='", interaction_name(args.interaction),
                "' (q is used by 'outer' only), got a tensor of shape ", shape_str(q->sizes()));
  }

  args.h0 = h0.contiguous();
  args.p = p.contiguous();
  args.batch = B;
  args.num_fields = static_cast<int>(F);
  args.embed_dim = static_cast<int>(D);
  args.depth = static_cast<int>(L);
  return args;
}

at::Tensor check_grad_states(const at::Tensor& grad_states, const PropagateArgs& args) {
  TORCH_CHECK(grad_states.defined(), "grad_states: expected a tensor, got an undefined tensor");
  check_like(grad_states, "grad_states", args.h0);
  check_shape(grad_states, "grad_states",
              {args.batch, int64_t(args.depth) + 1, int64_t(args.num_fields)}, "(B, L+1, F)");
  return grad_states.contiguous();
}

at::Tensor check_saved_messages(const std::optional<at::Tensor>& saved, const PropagateArgs& args) {
  if (!saved.has_value() || !saved->defined() || saved->numel() == 0) return at::Tensor();
  check_like(*saved, "saved", args.h0);
  const int64_t want = args.batch * args.depth * args.num_fields * int64_t(args.embed_dim);
  TORCH_CHECK(saved->dim() == 1 && saved->numel() == want,
              "saved: expected a 1-D tensor of B*L*F*D = ", want, " elements, got shape ",
              shape_str(saved->sizes()));
  return saved->contiguous();
}

at::Tensor check_grad_sum(const std::optional<at::Tensor>& grad_sum, const PropagateArgs& args) {
  if (!grad_sum.has_value() || !grad_sum->defined()) return at::Tensor();
  check_like(*grad_sum, "grad_sum", args.h0);
  check_shape(*grad_sum, "grad_sum", {args.batch, int64_t(args.num_fields), int64_t(args.embed_dim)},
              "(B, F, D)");
  return grad_sum->contiguous();
}

std::array<int64_t, 3> states_sizes(const PropagateArgs& args) {
  return {args.batch, int64_t(args.depth) + 1, int64_t(args.num_fields)};
}

at::Tensor empty_states(const PropagateArgs& args) { return at::empty(states_sizes(args), args.h0.options()); }

template <typename T>
PropagateParams<T> make_params(const PropagateArgs& args, at::Tensor& states) {
  PropagateParams<T> params;
  params.h0 = args.h0.data_ptr<T>();
  params.p = args.p.data_ptr<T>();
  params.q = args.q.defined() ? args.q.data_ptr<T>() : nullptr;
  params.states = states.defined() ? states.data_ptr<T>() : nullptr;
  params.batch = args.batch;
  params.num_fields = args.num_fields;
  params.embed_dim = args.embed_dim;
  params.depth = args.depth;
  params.interaction = args.interaction;
  return params;
}

template <typename T>
PropagateBackwardParams<T> make_backward_params(const PropagateArgs& args,
                                                const at::Tensor& grad_states, at::Tensor& grad_h0,
                                                at::Tensor& grad_p, at::Tensor& grad_q) {
  PropagateBackwardParams<T> params;
  at::Tensor no_states;
  static_cast<PropagateParams<T>&>(params) = make_params<T>(args, no_states);
  params.grad_states = grad_states.data_ptr<T>();
  params.grad_h0 = grad_h0.data_ptr<T>();
  params.grad_p = grad_p.data_ptr<T>();
  params.grad_q = args.q.defined() ? grad_q.data_ptr<T>() : nullptr;
  return params;
}

#define DAGFM_INSTANTIATE(T)                                                                      \
  template PropagateParams<T> make_params<T>(const PropagateArgs&, at::Tensor&);                  \
  template PropagateBackwardParams<T> make_backward_params<T>(                                    \
      const PropagateArgs&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&);
DAGFM_INSTANTIATE(float)
DAGFM_INSTANTIATE(double)
DAGFM_INSTANTIATE(at::Half)
DAGFM_INSTANTIATE(at::BFloat16)
#undef DAGFM_INSTANTIATE

}  // namespace dagfm

TORCH_LIBRARY(dagfm_ext, m) {
  m.def("propagate_fwd(Tensor h0, Tensor p, Tensor? q, str interaction) -> Tensor");
  // The training forward: the states plus what the backend keeps for its backward (the CPU and
  // CUDA kernels keep the messages a^1..a^L, flat (B * L * F * D); an empty tensor would make the
  // backward recompute them).
  m.def("propagate_fwd_train(Tensor h0, Tensor p, Tensor? q, str interaction) -> (Tensor, Tensor)");
  // grad_sum: the gradient of z = h^0 + ... + h^L (B, F, D), from propagate_sum_fwd_train.
  m.def(
      "propagate_bwd(Tensor grad_states, Tensor h0, Tensor p, Tensor? q, str interaction,"
      " Tensor? saved=None, Tensor? grad_sum=None) -> (Tensor, Tensor, Tensor)");
}
