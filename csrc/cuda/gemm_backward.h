// The kernel and outer interactions' backward as matrix products over the whole batch, from the
// messages a^1..a^L that a training forward kept (ATen ops: cuBLAS on CUDA, so TF32 follows
// PyTorch's float32 matmul precision there). The CUDA backend uses them in place of its CUDA-core
// backward (docs/cuda.md). Plain ATen, device-agnostic: every build compiles them, so that the CPU
// tests check their algebra through dagfm_ext._C._gemm_backward.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../ops.h"

namespace dagfm {

// grad_states (B, L+1, F), messages (flat B*L*F*D) and grad_sum (B, F, D, or undefined: none)
// already validated against args (kernel interaction). Returns (grad_h0, grad_p) in the dtypes of h0 and p; the lower triangle of grad_p
// is exactly zero and the lower triangle of p is never read.
std::tuple<at::Tensor, at::Tensor> kernel_backward_gemm(const at::Tensor& grad_states,
                                                        const PropagateArgs& args,
                                                        const at::Tensor& messages,
                                                        const at::Tensor& grad_sum = at::Tensor());

// The outer interaction is the kernel interaction with rank-1 blocks W_ij = p_ij (x) q_ij
// (a_j[e] = sum_i <p_ij, h_i> q_ij[e] = sum_i sum_d h_i[d] p_ij[d] q_ij[e]): its backward is
// kernel_backward_gemm on W, then dp_ij = dW_ij q_ij and dq_ij = dW_ij^T p_ij.
// Returns (grad_h0, grad_p, grad_q) in the dtypes of h0, p and q.
std::tuple<at::Tensor, at::Tensor, at::Tensor> outer_backward_gemm(const at::Tensor& grad_states,
                                                                   const PropagateArgs& args,
                                                                   const at::Tensor& messages,
                                                        const at::Tensor& grad_sum = at::Tensor());

}  // namespace dagfm
