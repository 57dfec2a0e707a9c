// Launches of the register-blocked algorithms (declared in register_blocked_launch.cuh). A
// translation unit without torch headers: it compiles in seconds, in parallel with dagfm_cuda.cu,
// which calls these.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "instantiations.h"
#include "register_blocked_launch.cuh"

namespace dagfm {
namespace cuda {
namespace rb {
namespace {

// A persistent grid for `kernel`: as many blocks as can be resident, at most one per tile (raises
// the kernel's dynamic shared-memory limit first when the plan needs more than 48 KB).
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, const RbPlan& plan, int64_t batch, int num_sms,
                            int64_t& grid) {
  cudaError_t err = cudaSuccess;
  if (plan.smem_bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.threads,
                                                      size_t(plan.smem_bytes));
  if (err != cudaSuccess) return err;
  const int64_t tiles = ceil_div64(batch, plan.cfg.tile_samples);
  grid = int64_t(per_sm > 0 ? per_sm : 1) * (num_sms > 0 ? num_sms : 1);
  if (grid > tiles) grid = tiles;
  if (grid < 1) grid = 1;
  return cudaSuccess;
}

template <typename Kernel, typename T>
cudaError_t launch(Kernel kernel, const PropagateParams<T>& prm, const RbPlan& plan, int num_sms,
                   cudaStream_t stream) {
  int64_t grid = 0;
  const cudaError_t err = persistent_grid(kernel, plan, prm.batch, num_sms, grid);
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(grid), unsigned(plan.threads), size_t(plan.smem_bytes), stream>>>(prm, plan.cfg);
  return cudaGetLastError();
}

template <int kB, typename T, typename Acc>
cudaError_t launch_with_samples_per_thread(const PropagateParams<T>& prm, const RbPlan& plan, int num_sms,
                      cudaStream_t stream) {
  switch (prm.interaction) {
    case Interaction::Inner:
      return launch(forward_inner_outer<Interaction::Inner, kB, T, Acc>, prm, plan, num_sms, stream);
    case Interaction::Outer:
      return launch(forward_inner_outer<Interaction::Outer, kB, T, Acc>, prm, plan, num_sms, stream);
    case Interaction::Kernel:
      return launch(forward_kernel_interaction<kB, T, Acc>, prm, plan, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

template <typename T, typename Acc>
cudaError_t launch_forward(const PropagateParams<T>& prm, const RbPlan& plan, int num_sms,
                           cudaStream_t stream) {
  if (!plan.ok) return cudaErrorInvalidValue;
#define DAGFM_LAUNCH_SAMPLES_PER_THREAD(kB, T_, Acc_) \
  if (plan.cfg.samples_per_thread == kB) return launch_with_samples_per_thread<kB, T_, Acc_>(prm, plan, num_sms, stream);
  DAGFM_CUDA_RB_SAMPLES_PER_THREAD(DAGFM_LAUNCH_SAMPLES_PER_THREAD, T, Acc)
#undef DAGFM_LAUNCH_SAMPLES_PER_THREAD
  return cudaErrorInvalidValue;
}

template <typename T, typename Acc>
cudaError_t backward_inner_grid(const RbPlan& plan, int64_t batch, int num_sms, int64_t& grid) {
  return persistent_grid(backward_inner<T, Acc>, plan, batch, num_sms, grid);
}

template <typename T, typename Acc>
cudaError_t launch_backward_inner(const PropagateBackwardParams<T>& prm, const RbPlan& plan,
                                  int64_t grid, Acc* ws, cudaStream_t stream) {
  if (!plan.ok || prm.saved_messages == nullptr) return cudaErrorInvalidValue;
  for (int t = prm.depth; t >= 1; --t) {
    const InnerBwdArgs a =
        inner_bwd_args(ws, prm.batch, prm.num_fields, prm.embed_dim, prm.depth, t);
    backward_inner<T, Acc><<<unsigned(grid), unsigned(plan.threads), size_t(plan.smem_bytes),
                                    stream>>>(prm, a, plan.cfg);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define DAGFM_RB_LAUNCHES(T, Acc)                                                                       \
  template cudaError_t launch_forward<T, Acc>(const PropagateParams<T>&, const RbPlan&, int, cudaStream_t); \
  template cudaError_t backward_inner_grid<T, Acc>(const RbPlan&, int64_t, int, int64_t&);                 \
  template cudaError_t launch_backward_inner<T, Acc>(const PropagateBackwardParams<T>&, const RbPlan&,     \
                                                     int64_t, Acc*, cudaStream_t);
DAGFM_CUDA_STORAGE_TYPES(DAGFM_RB_LAUNCHES)
#undef DAGFM_RB_LAUNCHES

}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
