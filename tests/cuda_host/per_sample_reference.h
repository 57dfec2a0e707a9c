// The reference the CUDA host tests compare against: dagfm_math.h's per-tile arithmetic (which
// the CPU kernels run and the CPU tests check against autograd), one sample at a time.
#pragma once

#include <cstdint>

#include "dagfm_math.h"

namespace dagfm {

inline int64_t sample_workspace_numel(int F, int D, int L) { return tile_workspace_numel(F, D, L, 1); }

template <typename T, typename Acc>
void sample_backward(Interaction kind, const T* h0_in, const T* p, const T* q, const T* grad_states,
                     Acc* grad_h0, Acc* grad_p, Acc* grad_q, Acc* ws, int F, int D, int L) {
  tile_backward<T, Acc>(kind, h0_in, p, q, grad_states, grad_h0, grad_p, grad_q, ws, F, D, L, 1);
}

}  // namespace dagfm
