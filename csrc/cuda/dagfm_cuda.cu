// CUDA implementations of dagfm_ext::propagate_fwd / propagate_bwd: argument checks (ops.cpp),
// the choice of algorithm for the call (path_selection.h) and the launches. The algorithms are in
// their own torch-free headers; docs/cuda.md lists them and says which runs when, and why.
//
// dtypes: float32 and float64 exactly; float16 and bfloat16 (storage __half / __nv_bfloat16,
// float accumulation, weight gradients summed in float and rounded once at the end). The
// kernel interaction's forward runs on tensor cores for float16 / bfloat16, and for float32 when
// PyTorch's float32 matmul precision allows TF32, read per call from ATen's global context (no
// schema change); exact float32 stays the default.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "../ops.h"
#include "gemm_backward.h"
#include "instantiations.h"
#include "one_output_per_thread.cuh"
#include "path_selection.h"
#include "register_blocked_launch.cuh"
#include "switches.h"
#include "tensor_core_forward.cuh"
#include "weight_grad_reduce.cuh"

namespace dagfm {
namespace cuda {
namespace {
Switches& current_switches() {
  static Switches switches = read_switches(std::getenv);
  return switches;
}
}  // namespace

const Switches& cuda_switches() { return current_switches(); }
void reread_cuda_switches() { current_switches() = read_switches(std::getenv); }

}  // namespace cuda

namespace {

using cuda::DeviceLimits;
using cuda::one_output::LaunchPlan;
using cuda::one_output::Pass;

DeviceLimits device_limits(int device) {
  DeviceLimits lim;
  int optin = 0, sms = 0, per_sm = 0, major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  lim.smem_optin = optin;
  lim.num_sms = sms;
  lim.smem_per_sm = per_sm;
  lim.cc_major = major;
  return lim;
}

// ATen's scalar types -> the storage types the torch-free kernels use (same size and bits).
template <typename scalar_t>
struct KernelScalar {
  using type = scalar_t;
};
template <>
struct KernelScalar<at::Half> {
  using type = __half;
};
template <>
struct KernelScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(at::Half) == sizeof(__half) && sizeof(at::BFloat16) == sizeof(__nv_bfloat16),
              "16-bit storage types must match");

template <typename K, typename S>
PropagateParams<K> as_kernel_params(const PropagateParams<S>& s) {
  PropagateParams<K> k;
  k.h0 = reinterpret_cast<const K*>(s.h0);
  k.p = reinterpret_cast<const K*>(s.p);
  k.q = reinterpret_cast<const K*>(s.q);
  k.states = reinterpret_cast<K*>(s.states);
  k.messages = reinterpret_cast<K*>(s.messages);
  k.batch = s.batch;
  k.num_fields = s.num_fields;
  k.embed_dim = s.embed_dim;
  k.depth = s.depth;
  k.interaction = s.interaction;
  return k;
}

template <typename K, typename S>
PropagateBackwardParams<K> as_kernel_params(const PropagateBackwardParams<S>& s) {
  PropagateBackwardParams<K> k;
  static_cast<PropagateParams<K>&>(k) = as_kernel_params<K>(static_cast<const PropagateParams<S>&>(s));
  k.grad_states = reinterpret_cast<const K*>(s.grad_states);
  k.saved_messages = reinterpret_cast<const K*>(s.saved_messages);
  k.grad_sum = reinterpret_cast<const K*>(s.grad_sum);
  k.grad_h0 = reinterpret_cast<K*>(s.grad_h0);
  k.grad_p = reinterpret_cast<K*>(s.grad_p);
  k.grad_q = reinterpret_cast<K*>(s.grad_q);
  return k;
}

// PyTorch's float32 matmul precision for CUDA allows TF32 (the convention of torch.matmul):
// torch.set_float32_matmul_precision("high"/"medium"), torch.backends.cuda.matmul.allow_tf32 =
// True or torch.backends.cuda.matmul.fp32_precision = "tf32"; torch's NoTF32Guard wins.
bool float32_tf32_allowed() {
  if (at::NoTF32Guard::should_disable_tf32()) return false;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  // The per-backend setting (this enum form is in torch 2.13 and 2.14, checked; older releases
  // spelled it differently). It reflects the legacy and the per-backend API alike, where
  // allowTF32CuBLAS() throws once a program has mixed the two.
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  // Older torch: the legacy query, which throws when the legacy and the per-backend API were
  // mixed (or only the per-backend one was used). Then stay exact: never less precise than asked.
  try {
    return at::globalContext().allowTF32CuBLAS();
  } catch (const c10::Error&) {
    return false;
  }
#endif
}

template <typename T, int NF, int MT>
void launch_forward_tc(const PropagateParams<T>& prm, const cuda::tc::TcPlan& plan,
                       const DeviceLimits& lim, cudaStream_t stream) {
  auto kernel = cuda::tc::forward_kernel_interaction<T, NF, MT>;
  const int threads = plan.warps * cuda::tc::kWarpSize;
  if (plan.smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(plan.smem_bytes)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                               size_t(plan.smem_bytes)));
  const int64_t warp_tiles = cuda::ceil_div64(prm.batch, cuda::tc::kRows * MT);
  const int64_t blocks = cuda::ceil_div64(warp_tiles, plan.warps);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(std::max(per_sm, 1)) * lim.num_sms));
  kernel<<<unsigned(grid), threads, size_t(plan.smem_bytes), stream>>>(prm, plan.ld, plan.state_bytes,
                                                                        plan.warp_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the tensor-core forward on the shape the plan was made for (D = 16 * NF, MT row tiles
// per warp; the shapes of instantiations.h).
template <typename T>
void launch_forward_tensor_cores(const PropagateParams<T>& prm, const cuda::tc::TcPlan& plan,
                                 const DeviceLimits& lim, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    switch (prm.embed_dim / 16 * 10 + plan.mt) {
#define DAGFM_TC_CASE(T_, NF, MT) \
  case NF * 10 + MT: launch_forward_tc<T_, NF, MT>(prm, plan, lim, stream); return;
      DAGFM_CUDA_TENSOR_CORE_SHAPES(DAGFM_TC_CASE, T)
#undef DAGFM_TC_CASE
      default: break;
    }
  }
  TORCH_CHECK(false, "dagfm_ext: no tensor-core kernel for D = ", prm.embed_dim, " (internal error)");
}

// The one-output-per-thread plan; DAGFM_CUDA_FORCE_GLOBAL_MEMORY leaves it no shared memory.
template <typename T, typename Acc>
LaunchPlan make_plan(Pass pass, Interaction kind, const PropagateParams<T>& prm,
                     const DeviceLimits& lim) {
  DeviceLimits use = lim;
  if (cuda::cuda_switches().force_global_memory) use.smem_optin = 0;
  return cuda::one_output::plan_launch<T, Acc>(pass, kind, prm.batch, prm.num_fields, prm.embed_dim,
                                               prm.depth, use);
}

// Raises the kernel's dynamic shared-memory limit when the plan needs more than the default
// 48 KB, and returns the grid: a persistent one, as many blocks as can be resident (capped by
// the tile count and the workspace budget).
template <typename Kernel>
int64_t prepare_launch(Kernel kernel, const LaunchPlan& plan, const DeviceLimits& lim,
                       int64_t tiles, int64_t acc_size) {
  if (plan.smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(plan.smem_bytes)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, cuda::one_output::kThreads,
                                                               size_t(plan.smem_bytes)));
  const int64_t resident = int64_t(per_sm > 0 ? per_sm : 1) * lim.num_sms;
  return cuda::one_output::choose_grid(tiles, resident, plan.ws_block_numel * acc_size);
}

template <typename Acc>
at::Tensor workspace(int64_t numel, const at::Tensor& like) {
  // Caching allocator on the current stream; never read before written (see the kernels).
  return at::empty({numel > 0 ? numel : 1}, like.options().dtype(c10::CppTypeToScalarType<Acc>::value));
}

// One launch of a propagation kernel on its persistent grid, with the per-block workspace
// (kept alive in `ws` until the caller is done with it).
template <typename Acc>
struct PassLaunch {
  at::Tensor ws;
  Acc* ws_ptr = nullptr;
  int64_t grid = 0;
};

template <typename Acc, typename Kernel, typename Params>
PassLaunch<Acc> launch_pass(Kernel kernel, const LaunchPlan& plan, const DeviceLimits& lim,
                            const Params& prm, const at::Tensor& like, cudaStream_t stream) {
  PassLaunch<Acc> out;
  out.grid = prepare_launch(kernel, plan, lim, cuda::ceil_div64(prm.batch, plan.cfg.tile_b), sizeof(Acc));
  if (plan.ws_block_numel > 0) {
    out.ws = workspace<Acc>(out.grid * plan.ws_block_numel, like);
    out.ws_ptr = out.ws.template data_ptr<Acc>();
  }
  kernel<<<unsigned(out.grid), cuda::one_output::kThreads, size_t(plan.smem_bytes), stream>>>(
      prm, plan.cfg, out.ws_ptr, plan.ws_block_numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <Interaction K, typename T, typename Acc>
void launch_forward(const PropagateParams<T>& prm, const cuda::ForwardChoice& choice, const DeviceLimits& lim,
                    const at::Tensor& like) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(like.get_device());
  switch (choice.path) {
    case cuda::ForwardPath::TensorCores:
      launch_forward_tensor_cores(prm, choice.tc_plan, lim, stream);
      return;
    case cuda::ForwardPath::RegisterBlocked:
      C10_CUDA_CHECK((cuda::rb::launch_forward<T, Acc>(prm, choice.rb_plan, lim.num_sms, stream)));
      return;
    case cuda::ForwardPath::OneOutputPerThread: {
      const LaunchPlan plan = make_plan<T, Acc>(Pass::Forward, K, prm, lim);
      launch_pass<Acc>(cuda::one_output::propagate_fwd_kernel<K, T, Acc>, plan, lim, prm, like, stream);
      return;
    }
  }
}

template <typename T, typename Acc>
void launch_reduce(const Acc* ws, int64_t ws_block_numel, int64_t num_blocks, int64_t part_offset,
                   int F, int64_t elems, int64_t total, T* out, int device, cudaStream_t stream) {
  if (total == 0) return;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div64(total, cuda::kReduceThreads), int64_t(sms) * 16);
  cuda::reduce_weight_grad_kernel<T, Acc><<<unsigned(blocks), cuda::kReduceThreads, 0, stream>>>(
      ws, ws_block_numel, num_blocks, part_offset, F, elems, total, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The register-blocked inner backward: layer-major launches that read the training forward's
// messages; then the per-block weight-gradient partials are added in block order.
template <typename T, typename Acc>
void launch_backward_rb_inner(const PropagateBackwardParams<T>& prm, const cuda::rb::RbPlan& plan,
                              const at::Tensor& like, const DeviceLimits& lim, cudaStream_t stream) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  int64_t grid = 0;
  cudaError_t err = cuda::rb::backward_inner_grid<T, Acc>(plan, prm.batch, lim.num_sms, grid);
  C10_CUDA_CHECK(err);
  const at::Tensor ws =
      workspace<Acc>(cuda::rb::backward_inner_workspace_numel(prm.batch, F, D, L, grid), like);
  Acc* ws_ptr = ws.template data_ptr<Acc>();
  err = cuda::rb::launch_backward_inner<T, Acc>(prm, plan, grid, ws_ptr, stream);
  C10_CUDA_CHECK(err);
  launch_reduce<T, Acc>(ws_ptr, cuda::rb::backward_inner_part_block_numel(F, D, L), grid,
                        cuda::rb::backward_inner_part_offset(prm.batch, F, D), F, int64_t(D),
                        int64_t(L) * F * F * D, prm.grad_p, like.get_device(), stream);
}

// The CUDA-core backwards (the GEMM one runs before the dtype dispatch).
template <Interaction K, typename T, typename Acc>
void launch_backward(const PropagateBackwardParams<T>& prm, const cuda::BackwardChoice& choice,
                     const DeviceLimits& lim, const at::Tensor& like) {
  const int device = like.get_device();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device);
  if (choice.path == cuda::BackwardPath::RegisterBlockedInner) {
    launch_backward_rb_inner<T, Acc>(prm, choice.rb_plan, like, lim, stream);
    return;
  }
  TORCH_CHECK(choice.path == cuda::BackwardPath::OneOutputPerThread, "dagfm_ext: unexpected backward path");
  const LaunchPlan plan = make_plan<T, Acc>(Pass::Backward, K, prm, lim);
  const PassLaunch<Acc> pass =
      launch_pass<Acc>(cuda::one_output::propagate_bwd_kernel<K, T, Acc>, plan, lim, prm, like, stream);
  const Acc* ws_ptr = pass.ws_ptr;
  const int64_t grid = pass.grid;
  // Weight gradients: add the per-block partials in block order (deterministic, no atomics).
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  const int64_t elems = cuda::one_output::edge_elems<K>(D);
  const int64_t total_p = int64_t(L) * F * F * elems;
  launch_reduce<T, Acc>(ws_ptr, plan.ws_block_numel, grid, 0, F, elems, total_p, prm.grad_p, device,
                        stream);
  if (K == Interaction::Outer) {
    const int64_t total_q = int64_t(L) * F * F * D;
    launch_reduce<T, Acc>(ws_ptr, plan.ws_block_numel, grid, int64_t(L) * cuda::num_edges(F) * elems,
                          F, int64_t(D), total_q, prm.grad_q, device, stream);
  }
}

cuda::StorageType storage_type(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cuda::StorageType::Float64;
    case at::kHalf: return cuda::StorageType::Float16;
    case at::kBFloat16: return cuda::StorageType::BFloat16;
    default: return cuda::StorageType::Float32;
  }
}

cuda::CallShape call_shape(const PropagateArgs& args) {
  cuda::CallShape shape;
  shape.interaction = args.interaction;
  shape.storage = storage_type(args.h0.scalar_type());
  shape.batch = args.batch;
  shape.num_fields = args.num_fields;
  shape.embed_dim = args.embed_dim;
  shape.depth = args.depth;
  return shape;
}

// Calls fn with the interaction as a compile-time constant (one kernel instantiation each).
template <typename Fn>
void dispatch_interaction(Interaction kind, Fn&& fn) {
  switch (kind) {
    case Interaction::Inner: fn(std::integral_constant<Interaction, Interaction::Inner>{}); break;
    case Interaction::Outer: fn(std::integral_constant<Interaction, Interaction::Outer>{}); break;
    case Interaction::Kernel: fn(std::integral_constant<Interaction, Interaction::Kernel>{}); break;
  }
}

// The forward; with keep_messages also the messages a^1..a^L (flat (B, L, F, D), h0's dtype),
// which the backward then reads instead of recomputing them.
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& h0, const at::Tensor& p,
                                                const std::optional<at::Tensor>& q,
                                                c10::string_view interaction, bool keep_messages) {
  const PropagateArgs args =
      check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  const c10::cuda::CUDAGuard guard(args.h0.device());
  at::Tensor states = empty_states(args);
  at::Tensor messages = at::empty(
      {keep_messages ? args.batch * args.depth * args.num_fields * int64_t(args.embed_dim) : 0},
      args.h0.options());
  if (args.batch == 0) return {states, messages};
  cuda::ForwardCall call;
  static_cast<cuda::CallShape&>(call) = call_shape(args);
  call.weights_address = reinterpret_cast<uintptr_t>(args.p.data_ptr());
  // Read only where it matters (the kernel interaction in float32): the query may be slow or throw.
  call.tf32_allowed = call.interaction == Interaction::Kernel && call.storage == cuda::StorageType::Float32 &&
                      float32_tf32_allowed();
  const DeviceLimits lim = device_limits(args.h0.get_device());
  const cuda::ForwardChoice choice = cuda::choose_forward(call, lim, cuda::cuda_switches());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.h0.scalar_type(), "propagate_fwd_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;  // float for float16 / bfloat16
    using T = typename KernelScalar<scalar_t>::type;
    auto params = as_kernel_params<T>(make_params<scalar_t>(args, states));
    if (messages.numel() > 0) params.messages = reinterpret_cast<T*>(messages.data_ptr<scalar_t>());
    dispatch_interaction(args.interaction, [&](auto k) {
      launch_forward<decltype(k)::value, T, Acc>(params, choice, lim, args.h0);
    });
  });
  return {states, messages};
}

at::Tensor propagate_fwd_cuda(const at::Tensor& h0, const at::Tensor& p,
                              const std::optional<at::Tensor>& q, c10::string_view interaction) {
  return std::get<0>(forward_cuda(h0, p, q, interaction, false));
}

// The training forward keeps the messages (as the CPU one does): the backward then skips the
// forward's layer products. B*L*F*D values per step (490 MB at B = 65,536, F=39, D=16, L=3 fp32).
std::tuple<at::Tensor, at::Tensor> propagate_fwd_train_cuda(const at::Tensor& h0, const at::Tensor& p,
                                                            const std::optional<at::Tensor>& q,
                                                            c10::string_view interaction) {
  return forward_cuda(h0, p, q, interaction, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_bwd_cuda(
    const at::Tensor& grad_states, const at::Tensor& h0, const at::Tensor& p,
    const std::optional<at::Tensor>& q, c10::string_view interaction,
    const std::optional<at::Tensor>& saved, const std::optional<at::Tensor>& grad_sum) {
  const PropagateArgs args =
      check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  const c10::cuda::CUDAGuard guard(args.h0.device());
  const at::Tensor gs = check_grad_states(grad_states, args);
  const at::Tensor gsum = check_grad_sum(grad_sum, args);  // undefined: z has no gradient
  // The training forward's messages, or undefined: then the backward recomputes them on chip.
  const at::Tensor msgs = check_saved_messages(saved, args);
  if (args.batch == 0) {
    return {at::empty_like(args.h0), at::zeros_like(args.p),
            args.q.defined() ? at::zeros_like(args.q) : at::empty({0}, args.p.options())};
  }
  cuda::BackwardCall call;
  static_cast<cuda::CallShape&>(call) = call_shape(args);
  call.messages_saved = msgs.defined();
  const DeviceLimits lim = device_limits(args.h0.get_device());
  const cuda::BackwardChoice choice = cuda::choose_backward(call, lim, cuda::cuda_switches());
  // Matrix products per layer on cuBLAS (gemm_backward.h): no dtype dispatch of ours.
  if (choice.path == cuda::BackwardPath::Gemm) {
    if (args.interaction == Interaction::Outer) return outer_backward_gemm(gs, args, msgs, gsum);
    auto [grad_h0, grad_p] = kernel_backward_gemm(gs, args, msgs, gsum);
    return {grad_h0, grad_p, at::empty({0}, args.p.options())};
  }
  // Every element (lower triangle included) is written by the reduction kernel.
  at::Tensor grad_h0 = at::empty_like(args.h0);
  at::Tensor grad_p = at::empty_like(args.p);
  at::Tensor grad_q = args.q.defined() ? at::empty_like(args.q) : at::empty({0}, args.p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.h0.scalar_type(), "propagate_bwd_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    using T = typename KernelScalar<scalar_t>::type;
    auto params =
        as_kernel_params<T>(make_backward_params<scalar_t>(args, gs, grad_h0, grad_p, grad_q));
    if (msgs.defined()) params.saved_messages = reinterpret_cast<const T*>(msgs.data_ptr<scalar_t>());
    if (gsum.defined()) params.grad_sum = reinterpret_cast<const T*>(gsum.data_ptr<scalar_t>());
    dispatch_interaction(args.interaction, [&](auto k) {
      launch_backward<decltype(k)::value, T, Acc>(params, choice, lim, args.h0);
    });
  });
  return {grad_h0, grad_p, grad_q};
}

}  // namespace
}  // namespace dagfm

TORCH_LIBRARY_IMPL(dagfm_ext, CUDA, m) {
  m.impl("propagate_fwd", &dagfm::propagate_fwd_cuda);
  m.impl("propagate_fwd_train", &dagfm::propagate_fwd_train_cuda);
  m.impl("propagate_bwd", &dagfm::propagate_bwd_cuda);
}
