// dagfm_ext::field_mix / field_mix_bwd: the students' field mixing h0[b] = C x[b] as ops. This
// header holds what every backend shares: the argument checks and the composite (at::bmm) form
// that runs wherever there is no dedicated kernel (CUDA, float16 / bfloat16 on the CPU).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace dagfm {

// Inputs after validation, made contiguous (a non-contiguous input is copied, never misread).
struct FieldMixArgs {
  at::Tensor x;        // (B, F, D)
  at::Tensor connect;  // (F, F)
  int64_t batch = 0;
  int num_fields = 0;
  int embed_dim = 0;
};

// Raises a c10::Error (RuntimeError in Python) naming the argument and what was expected.
FieldMixArgs check_field_mix_args(const at::Tensor& x, const at::Tensor& connect);
// grad (B, F, D) of the forward's output: checked against the forward's arguments, contiguous.
at::Tensor check_field_mix_grad(const at::Tensor& grad, const FieldMixArgs& args);

// C x[b] for every b, and (C^T g[b], sum_b g[b] x[b]^T), as batched products.
at::Tensor field_mix_composite(const FieldMixArgs& args);
std::tuple<at::Tensor, at::Tensor> field_mix_bwd_composite(const at::Tensor& grad, const FieldMixArgs& args);

}  // namespace dagfm
