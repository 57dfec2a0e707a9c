// The Python module dagfm_ext._C: importing it loads the op registrations (ops.cpp and the
// backend files are linked into it); build_info() says what this build contains.
#include <torch/extension.h>
#include <torch/version.h>

#include <optional>
#include <string>
#include <tuple>

#include "cuda/gemm_backward.h"
#include "ops.h"

#ifdef DAGFM_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION

#include "cuda/switches.h"
#endif

namespace {

#ifndef DAGFM_CUDA_ARCH_LIST
#define DAGFM_CUDA_ARCH_LIST ""
#endif

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef DAGFM_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(DAGFM_CUDA_ARCH_LIST);
#ifdef CUDA_VERSION
  info["cuda_version"] = CUDA_VERSION;
#endif
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#endif
  info["cpu_kernels"] = true;
  return info;
}

// For the tests: the GEMM backward (cuda/gemm_backward.h) of the kernel or outer interaction, any device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_backward_py(const at::Tensor& grad_states,
                                                                const at::Tensor& h0, const at::Tensor& p,
                                                                const std::optional<at::Tensor>& q,
                                                                const std::string& interaction,
                                                                const at::Tensor& saved,
                                                                const std::optional<at::Tensor>& grad_sum) {
  const dagfm::PropagateArgs args = dagfm::check_propagate_args(h0, p, q, interaction);
  TORCH_CHECK(args.interaction != dagfm::Interaction::Inner,
              "interaction: expected 'outer' or 'kernel' (inner has no GEMM backward), got 'inner'");
  const at::Tensor gs = dagfm::check_grad_states(grad_states, args);
  const at::Tensor msgs = dagfm::check_saved_messages(saved, args);
  TORCH_CHECK(msgs.defined() || args.batch * args.depth == 0, "saved: the messages are required");
  const at::Tensor m = msgs.defined() ? msgs : at::empty({0}, args.h0.options());
  const at::Tensor gsum = dagfm::check_grad_sum(grad_sum, args);
  if (args.interaction == dagfm::Interaction::Outer) return dagfm::outer_backward_gemm(gs, args, m, gsum);
  auto [grad_h0, grad_p] = dagfm::kernel_backward_gemm(gs, args, m, gsum);
  return {grad_h0, grad_p, at::empty({0}, args.p.options())};
}

// The inference forward below the autograd layer: one C++ call for a caller that has already seen
// that no gradient is needed (dagfm_ext.functional), instead of the op's Python autograd kernel.
// Everything below autograd (autocast, Python modes, the backend and its checks) runs as usual.
at::Tensor propagate_fwd_no_grad(const at::Tensor& h0, const at::Tensor& p, const std::optional<at::Tensor>& q,
                                 const std::string& interaction) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dagfm_ext::propagate_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(h0, p, q, interaction);
}

// field_mix (x, connect) below the autograd layer, as propagate_fwd_no_grad: at serving batches the
// mixing is a few microseconds of work, comparable to the autograd layer's own cost.
at::Tensor field_mix_no_grad(const at::Tensor& x, const at::Tensor& connect) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dagfm_ext::field_mix", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, connect);
}

// For the tests: reads the CUDA backend's environment switches again (they are read once per
// process otherwise). Nothing to read in a build without CUDA.
void reread_cuda_switches_py() {
#ifdef DAGFM_WITH_CUDA
  dagfm::cuda::reread_cuda_switches();
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dagfm_ext compiled kernels (registers the dagfm_ext::* custom ops on import)";
  m.def("build_info", &build_info, "What this build contains: CUDA, architectures, torch, compiler");
  m.def("_gemm_backward", &gemm_backward_py,
        "Test hook: the GEMM backward (grad_states, h0, p, q, interaction, saved, grad_sum=None) -> "
        "(dh0, dp, dq)",
        pybind11::arg("grad_states"), pybind11::arg("h0"), pybind11::arg("p"), pybind11::arg("q"),
        pybind11::arg("interaction"), pybind11::arg("saved"), pybind11::arg("grad_sum") = pybind11::none());
  m.def("_propagate_fwd_no_grad", &propagate_fwd_no_grad,
        "propagate_fwd (h0, p, q, interaction) below the autograd layer: for callers that need no gradient",
        pybind11::arg("h0"), pybind11::arg("p"), pybind11::arg("q"), pybind11::arg("interaction"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("_field_mix_no_grad", &field_mix_no_grad,
        "field_mix (x, connect) below the autograd layer: for callers that need no gradient", pybind11::arg("x"),
        pybind11::arg("connect"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("_reread_cuda_switches", &reread_cuda_switches_py,
        "Test hook: read the DAGFM_CUDA_* environment switches again (otherwise read once per process)");
}
