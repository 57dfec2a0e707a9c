// Launches of the register-blocked forward (dagfm_rb.cuh). A translation unit without torch
// headers: it compiles in seconds, in parallel with dagfm_cuda.cu, which calls launch_forward.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dagfm_rb.cuh"

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
  const int64_t tiles = ceil_div64(batch, plan.cfg.tb);
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
cudaError_t launch_kb(const PropagateParams<T>& prm, const RbPlan& plan, int num_sms,
                      cudaStream_t stream) {
  switch (prm.interaction) {
    case Interaction::Inner:
      return launch(forward_kernel<Interaction::Inner, kB, T, Acc>, prm, plan, num_sms, stream);
    case Interaction::Outer:
      return launch(forward_kernel<Interaction::Outer, kB, T, Acc>, prm, plan, num_sms, stream);
    case Interaction::Kernel:
      return launch(kernel_forward_kernel<kB, T, Acc>, prm, plan, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

template <typename T, typename Acc>
cudaError_t launch_forward(const PropagateParams<T>& prm, const RbPlan& plan, int num_sms,
                           cudaStream_t stream) {
  if (!plan.ok) return cudaErrorInvalidValue;
  if (plan.cfg.kb == 8) return launch_kb<8, T, Acc>(prm, plan, num_sms, stream);
  if (plan.cfg.kb == 4) return launch_kb<4, T, Acc>(prm, plan, num_sms, stream);
  return cudaErrorInvalidValue;
}

template <typename T, typename Acc>
cudaError_t backward_inner_grid(const RbPlan& plan, int64_t batch, int num_sms, int64_t& grid) {
  return persistent_grid(inner_backward_kernel<T, Acc>, plan, batch, num_sms, grid);
}

template <typename T, typename Acc>
cudaError_t launch_backward_inner(const PropagateBackwardParams<T>& prm, const RbPlan& plan,
                                  int64_t grid, Acc* ws, cudaStream_t stream) {
  if (!plan.ok || prm.saved_messages == nullptr) return cudaErrorInvalidValue;
  for (int t = prm.depth; t >= 1; --t) {
    const InnerBwdArgs a =
        inner_bwd_args(ws, prm.batch, prm.num_fields, prm.embed_dim, prm.depth, t);
    inner_backward_kernel<T, Acc><<<unsigned(grid), unsigned(plan.threads), size_t(plan.smem_bytes),
                                    stream>>>(prm, a, plan.cfg);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define DAGFM_RB_BACKWARD(T, Acc)                                                                 \
  template cudaError_t backward_inner_grid<T, Acc>(const RbPlan&, int64_t, int, int64_t&);       \
  template cudaError_t launch_backward_inner<T, Acc>(const PropagateBackwardParams<T>&,           \
                                                     const RbPlan&, int64_t, Acc*, cudaStream_t);
DAGFM_RB_BACKWARD(float, float)
DAGFM_RB_BACKWARD(double, double)
DAGFM_RB_BACKWARD(__half, float)
DAGFM_RB_BACKWARD(__nv_bfloat16, float)
#undef DAGFM_RB_BACKWARD

template cudaError_t launch_forward<float, float>(const PropagateParams<float>&, const RbPlan&, int,
                                                  cudaStream_t);
template cudaError_t launch_forward<double, double>(const PropagateParams<double>&, const RbPlan&,
                                                    int, cudaStream_t);
template cudaError_t launch_forward<__half, float>(const PropagateParams<__half>&, const RbPlan&,
                                                   int, cudaStream_t);
template cudaError_t launch_forward<__nv_bfloat16, float>(const PropagateParams<__nv_bfloat16>&,
                                                          const RbPlan&, int, cudaStream_t);

}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
