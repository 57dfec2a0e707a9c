// C++ test of the ops library through the dispatcher (no Python): the fused forward and backward
// against the same maths written with ATen ops, for each interaction, plus an argument check.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// States with plain ATen ops, differentiable by autograd.
at::Tensor reference_states(const at::Tensor& h0, const at::Tensor& p, const std::optional<at::Tensor>& q,
                            const std::string& kind) {
  const int64_t F = h0.size(1), L = p.size(0);
  at::Tensor mask = at::ones({F, F}, h0.options()).triu();
  at::Tensor h = h0;
  std::vector<at::Tensor> states{h0.sum(-1)};
  for (int64_t t = 0; t < L; ++t) {
    at::Tensor a;
    if (kind == "inner") {
      a = at::einsum("bid,ijd->bjd", {h, p[t] * mask.unsqueeze(-1)});
    } else if (kind == "outer") {
      at::Tensor c = at::einsum("bid,ijd->bij", {h, p[t] * mask.unsqueeze(-1)});
      a = at::einsum("bij,ijd->bjd", {c, (*q)[t]});
    } else {
      a = at::einsum("bid,ijde->bje", {h, p[t] * mask.unsqueeze(-1).unsqueeze(-1)});
    }
    h = h0 * a;
    states.push_back(h.sum(-1));
  }
  return at::stack(states, 1);
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item<double>();
}

}  // namespace

int main() {
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("dagfm_ext::propagate_fwd", "")
                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("dagfm_ext::propagate_bwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, c10::string_view,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  at::manual_seed(0);
  const int64_t B = 70, F = 6, D = 9, L = 3;
  for (const std::string kind : {"inner", "outer", "kernel"}) {
    auto opts = at::TensorOptions().dtype(at::kDouble);
    at::Tensor h0 = at::randn({B, F, D}, opts).requires_grad_();
    at::Tensor p = (kind == "kernel" ? at::randn({L, F, F, D, D}, opts) * 0.1 : at::randn({L, F, F, D}, opts) * 0.3)
                       .requires_grad_();
    std::optional<at::Tensor> q;
    if (kind == "outer") q = (at::randn({L, F, F, D}, opts) * 0.3).requires_grad_();

    at::Tensor expected = reference_states(h0, p, q, kind);
    at::Tensor got = fwd.call(h0.detach(), p.detach(), q ? std::optional<at::Tensor>(q->detach()) : q, kind);
    expect(rel_err(got, expected.detach()) < 1e-12, kind + " forward matches the ATen reference");

    at::Tensor grad = at::randn_like(expected);
    std::vector<at::Tensor> inputs{h0, p};
    if (q) inputs.push_back(*q);
    auto ref_grads = torch::autograd::grad({expected}, inputs, {grad});
    auto [gh0, gp, gq] = bwd.call(grad, h0.detach(), p.detach(),
                                  q ? std::optional<at::Tensor>(q->detach()) : q, kind, std::nullopt,
                                  std::nullopt);
    expect(rel_err(gh0, ref_grads[0]) < 1e-12, kind + " grad h0");
    expect(rel_err(gp, ref_grads[1]) < 1e-12, kind + " grad p");
    if (q) expect(rel_err(gq, ref_grads[2]) < 1e-12, kind + " grad q");
  }

  bool raised = false;
  try {
    fwd.call(at::randn({2, 3, 4}), at::randn({1, 3, 3, 5}), std::nullopt, "inner");
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("p: expected shape") != std::string::npos;
  }
  expect(raised, "a wrong p shape raises an error naming p");

  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
