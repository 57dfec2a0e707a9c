// The register-blocked algorithms as the launch code sees them: the forward's planner for any
// interaction, and the launches, defined in register_blocked_launch.cu (a translation unit without
// torch headers that compiles in parallel with dagfm_cuda.cu) for every storage type of
// instantiations.h.
#pragma once

#include <cstdint>

#include "register_blocked_forward.cuh"
#include "register_blocked_inner_backward.cuh"
#include "register_blocked_kernel_interaction.cuh"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

namespace dagfm {
namespace cuda {
namespace rb {

// The forward's plan for `kind` (the kernel interaction has its own layout); `force_tb` (> 0) pins
// the samples per tile (tuning runs). plan.ok is false when nothing fits.
inline RbPlan plan_forward(Interaction kind, int64_t batch, int F, int D, int acc_size,
                           const DeviceLimits& lim, int force_tb = 0) {
  if (F < 1 || D < 1 || acc_size <= 0) return RbPlan{};
  if (kind == Interaction::Kernel) return plan_forward_kernel_interaction(batch, F, D, acc_size, lim, force_tb);
  return plan_forward_inner_outer(kind, batch, F, D, acc_size, lim, force_tb);
}

#if defined(__CUDACC__)

// Launches forward_inner_outer (forward_kernel_interaction for the kernel interaction) with `plan`
// on a persistent grid.
template <typename T, typename Acc>
cudaError_t launch_forward(const PropagateParams<T>& prm, const RbPlan& plan, int num_sms,
                           cudaStream_t stream);

// The inner backward (plan_backward_inner): its grid (persistent, the same for every layer),
// then the L layer launches. The caller gives a workspace of backward_inner_workspace_numel Acc
// elements and afterwards adds the per-block partials (at part_offset, per block
// part_block_numel) with reduce_weight_grad_kernel (weight_grad_reduce.cuh).
template <typename T, typename Acc>
cudaError_t backward_inner_grid(const RbPlan& plan, int64_t batch, int num_sms, int64_t& grid);
template <typename T, typename Acc>
cudaError_t launch_backward_inner(const PropagateBackwardParams<T>& prm, const RbPlan& plan,
                                  int64_t grid, Acc* ws, cudaStream_t stream);
#endif  // __CUDACC__

}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
