// Plain description of one DAG-propagation call, shared by the CPU and CUDA kernels.
// No torch includes: the CUDA kernels that use it compile with plain nvcc in seconds.
#pragma once

#include <cstdint>

namespace dagfm {

enum class Interaction : int { Inner = 0, Outer = 1, Kernel = 2 };

// Every tensor is contiguous and row-major (ops.cpp makes it so):
//   h0          (B, F, D)
//   p           (L, F, F, D)       inner / outer;  (L, F, F, D, D) kernel
//   q           (L, F, F, D)       outer only, else nullptr
//   states      (B, L+1, F)        forward output; states[b, t, j] = sum_d h^t_j[d]
//   messages    (B, L, F, D)       optional forward output (CUDA training forward): a^1..a^L,
//                                  h^t = h0 * a^t; the backward reads them instead of recomputing
//   grad_states (B, L+1, F)        backward input
//   grad_sum    (B, F, D)          optional backward input: dLoss/dz for z = h^0 + ... + h^L,
//                                  added to every delta^t next to the broadcast grad_states
//   grad_h0, grad_p, grad_q        backward outputs, same shapes as h0, p, q
template <typename T>
struct PropagateParams {
  const T* h0 = nullptr;
  const T* p = nullptr;
  const T* q = nullptr;
  T* states = nullptr;
  T* messages = nullptr;  // nullptr: not kept
  T* sum_out = nullptr;   // CPU forward, nullptr or (B, F, D): z = h^0 + h^1 + ... + h^L

  int64_t batch = 0;
  int num_fields = 0;  // F
  int embed_dim = 0;   // D
  int depth = 0;       // L
  Interaction interaction = Interaction::Inner;

  // Elements of one layer's weight tensor: F*F*D (inner/outer) or F*F*D*D (kernel).
  int64_t layer_weight_numel() const {
    const int64_t edges = int64_t(num_fields) * num_fields;
    return interaction == Interaction::Kernel ? edges * embed_dim * embed_dim : edges * embed_dim;
  }
  int64_t weight_numel() const { return depth * layer_weight_numel(); }
};

template <typename T>
struct PropagateBackwardParams : PropagateParams<T> {
  const T* grad_states = nullptr;
  const T* saved_messages = nullptr;  // a forward's `messages`, or nullptr: recompute
  const T* grad_sum = nullptr;        // nullptr: the sum z has no gradient
  T* grad_h0 = nullptr;
  T* grad_p = nullptr;
  T* grad_q = nullptr;  // outer only
};

}  // namespace dagfm
