// The kernel interaction's backward as matrix products over the whole batch, from the messages
// a^1..a^L that a training forward kept (ATen ops: cuBLAS on CUDA, so TF32 follows PyTorch's
// float32 matmul precision there). The CUDA backend uses it in place of its CUDA-core backward;
// it is device-agnostic so that the CPU tests check its algebra (dagfm_ext._C._kernel_backward_gemm).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "ops.h"

namespace dagfm {

// grad_states (B, L+1, F) and messages (flat B*L*F*D) already validated against args (kernel
// interaction). Returns (grad_h0, grad_p) in the dtypes of h0 and p; the lower triangle of grad_p
// is exactly zero and the lower triangle of p is never read.
std::tuple<at::Tensor, at::Tensor> kernel_backward_gemm(const at::Tensor& grad_states,
                                                        const PropagateArgs& args,
                                                        const at::Tensor& messages);

}  // namespace dagfm
