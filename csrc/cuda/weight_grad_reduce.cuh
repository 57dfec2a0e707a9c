// The last step of every CUDA-core backward: each block has summed its tiles' weight gradients
// into its own workspace slice (packed upper triangle); this adds the slices in block order into
// the full (L, F, F, ...) gradient. No float atomics, so the result depends only on the batch, the
// shapes and the grid size. No torch includes.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dagfm {
namespace cuda {

constexpr int kReduceThreads = 256;  // threads per block of reduce_weight_grad_kernel

// out[idx] for idx over the full (L, F, F, elems) gradient: zero below the diagonal, else the
// block partials of part_offset + (l, packed edge, x) summed in block order.
template <typename T, typename Acc>
DAGFM_HD void reduce_weight_grad_element(int64_t idx, const Acc* DAGFM_RESTRICT ws,
                                         int64_t ws_block_numel, int64_t num_blocks,
                                         int64_t part_offset, int F, int64_t elems,
                                         T* DAGFM_RESTRICT out) {
  const int64_t x = idx % elems;
  int64_t r = idx / elems;
  const int j = int(r % F);
  r /= F;
  const int i = int(r % F);
  const int64_t l = r / F;
  if (i > j) {
    out[idx] = cvt<T>(Acc(0));
    return;
  }
  const int64_t off = part_offset + (l * num_edges(F) + row_start(i, F) + (j - i)) * elems + x;
  Acc s = Acc(0);
  for (int64_t g = 0; g < num_blocks; ++g) s += ws[g * ws_block_numel + off];
  out[idx] = cvt<T>(s);
}

#if defined(__CUDACC__)
template <typename T, typename Acc>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_weight_grad_kernel(const Acc* ws, int64_t ws_block_numel, int64_t num_blocks,
                              int64_t part_offset, int F, int64_t elems, int64_t total, T* out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride)
    reduce_weight_grad_element<T, Acc>(idx, ws, ws_block_numel, num_blocks, part_offset, F, elems,
                                       out);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dagfm
