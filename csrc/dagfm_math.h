// Per-sample DAG-propagation arithmetic (DESIGN.md §2), shared by the CPU kernels and the CUDA
// fallback path. No torch includes. `T` is the storage type of the weights, `Acc` the type the
// states and sums are kept in (float for float/half/bfloat16, double for double).
//
// Layouts for one sample: h0, h, a, delta are (F, D) row-major; one layer's weights are
// p[i][j][d] (inner/outer, and q likewise) or p[i][j][d][e] (kernel). Only edges i <= j exist.
#pragma once

#include "dagfm_params.h"

#if defined(__CUDACC__)
#define DAGFM_HD __host__ __device__ __forceinline__
#define DAGFM_RESTRICT __restrict__
#else
#define DAGFM_HD inline
#define DAGFM_RESTRICT __restrict__
#endif

// Lets the host compiler vectorise the short reductions over D without -ffast-math
// (built with -fopenmp-simd; nvcc and compilers without it ignore the macros).
#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
#define DAGFM_PRAGMA(x) _Pragma(#x)
#define DAGFM_SIMD_REDUCE(var) DAGFM_PRAGMA(omp simd reduction(+ : var))
#define DAGFM_SIMD _Pragma("omp simd")
#else
#define DAGFM_SIMD_REDUCE(var)
#define DAGFM_SIMD
#endif

namespace dagfm {

// Offset of edge (i, j) in one layer's weight tensor, counted in elements.
DAGFM_HD int64_t edge_offset(int i, int j, int num_fields, int edge_numel) {
  return (int64_t(i) * num_fields + j) * edge_numel;
}

template <typename T, typename Acc>
DAGFM_HD Acc dot(const T* DAGFM_RESTRICT w, const Acc* DAGFM_RESTRICT h, int D) {
  Acc s = Acc(0);
  DAGFM_SIMD_REDUCE(s)
  for (int d = 0; d < D; ++d) s += Acc(w[d]) * h[d];
  return s;
}

template <typename Acc>
DAGFM_HD Acc sum(const Acc* DAGFM_RESTRICT x, int D) {
  Acc s = Acc(0);
  DAGFM_SIMD_REDUCE(s)
  for (int d = 0; d < D; ++d) s += x[d];
  return s;
}

// One layer forward for one sample: a_j = sum_{i<=j} message(i -> j), h_next_j = h0_j * a_j.
template <typename T, typename Acc>
DAGFM_HD void layer_forward(Interaction kind, const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q,
                            const Acc* DAGFM_RESTRICT h0, const Acc* DAGFM_RESTRICT h_prev,
                            Acc* DAGFM_RESTRICT a, Acc* DAGFM_RESTRICT h_next, int F, int D) {
  const int edge_numel = kind == Interaction::Kernel ? D * D : D;
  for (int j = 0; j < F; ++j) {
    Acc* DAGFM_RESTRICT aj = a + int64_t(j) * D;
    for (int d = 0; d < D; ++d) aj[d] = Acc(0);
    for (int i = 0; i <= j; ++i) {
      const Acc* DAGFM_RESTRICT hi = h_prev + int64_t(i) * D;
      const T* DAGFM_RESTRICT w = p + edge_offset(i, j, F, edge_numel);
      if (kind == Interaction::Inner) {
        DAGFM_SIMD
        for (int d = 0; d < D; ++d) aj[d] += Acc(w[d]) * hi[d];
      } else if (kind == Interaction::Outer) {
        const Acc c = dot(w, hi, D);
        const T* DAGFM_RESTRICT qij = q + edge_offset(i, j, F, D);
        DAGFM_SIMD
        for (int e = 0; e < D; ++e) aj[e] += c * Acc(qij[e]);
      } else {
        for (int d = 0; d < D; ++d) {
          const Acc hd = hi[d];
          const T* DAGFM_RESTRICT wd = w + int64_t(d) * D;
          DAGFM_SIMD
          for (int e = 0; e < D; ++e) aj[e] += hd * Acc(wd[e]);
        }
      }
    }
    const Acc* DAGFM_RESTRICT h0j = h0 + int64_t(j) * D;
    Acc* DAGFM_RESTRICT hj = h_next + int64_t(j) * D;
    DAGFM_SIMD
    for (int d = 0; d < D; ++d) hj[d] = h0j[d] * aj[d];
  }
}

// One layer backward for one sample (DESIGN.md §2, t = the layer, h_prev = h^{t-1}, a = a^t).
//   delta      in : dLoss/dh^t (F, D)
//   delta_prev in : G[t-1] broadcast over d;  out: dLoss/dh^{t-1}
//   alpha      scratch (F, D)
//   grad_h0    accumulates delta * a
//   grad_p, grad_q accumulate this sample's weight gradients for the layer
template <typename T, typename Acc>
DAGFM_HD void layer_backward(Interaction kind, const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q,
                             const Acc* DAGFM_RESTRICT h0, const Acc* DAGFM_RESTRICT h_prev,
                             const Acc* DAGFM_RESTRICT a, const Acc* DAGFM_RESTRICT delta,
                             Acc* DAGFM_RESTRICT delta_prev, Acc* DAGFM_RESTRICT alpha,
                             Acc* DAGFM_RESTRICT grad_h0, Acc* DAGFM_RESTRICT grad_p,
                             Acc* DAGFM_RESTRICT grad_q, int F, int D) {
  const int64_t FD = int64_t(F) * D;
  DAGFM_SIMD
  for (int64_t k = 0; k < FD; ++k) {
    alpha[k] = delta[k] * h0[k];
    grad_h0[k] += delta[k] * a[k];
  }
  const int edge_numel = kind == Interaction::Kernel ? D * D : D;
  for (int j = 0; j < F; ++j) {
    const Acc* DAGFM_RESTRICT alj = alpha + int64_t(j) * D;
    for (int i = 0; i <= j; ++i) {
      const Acc* DAGFM_RESTRICT hi = h_prev + int64_t(i) * D;
      Acc* DAGFM_RESTRICT di = delta_prev + int64_t(i) * D;
      const int64_t off = edge_offset(i, j, F, edge_numel);
      const T* DAGFM_RESTRICT w = p + off;
      Acc* DAGFM_RESTRICT gw = grad_p + off;
      if (kind == Interaction::Inner) {
        DAGFM_SIMD
        for (int d = 0; d < D; ++d) {
          gw[d] += alj[d] * hi[d];
          di[d] += Acc(w[d]) * alj[d];
        }
      } else if (kind == Interaction::Outer) {
        const T* DAGFM_RESTRICT qij = q + off;
        Acc* DAGFM_RESTRICT gq = grad_q + off;
        const Acc c = dot(w, hi, D);
        const Acc r = dot(qij, alj, D);
        DAGFM_SIMD
        for (int d = 0; d < D; ++d) {
          gq[d] += c * alj[d];
          gw[d] += r * hi[d];
          di[d] += r * Acc(w[d]);
        }
      } else {
        for (int d = 0; d < D; ++d) {
          const Acc hd = hi[d];
          const T* DAGFM_RESTRICT wd = w + int64_t(d) * D;
          Acc* DAGFM_RESTRICT gwd = gw + int64_t(d) * D;
          Acc s = Acc(0);
          DAGFM_SIMD_REDUCE(s)
          for (int e = 0; e < D; ++e) {
            gwd[e] += hd * alj[e];
            s += Acc(wd[e]) * alj[e];
          }
          di[d] += s;
        }
      }
    }
  }
}

// Workspace one sample needs, in Acc elements: h^0..h^L, a^1..a^L, delta, delta_prev, alpha.
DAGFM_HD int64_t sample_workspace_numel(int F, int D, int L) {
  return int64_t(F) * D * (2 * L + 4);
}

// Forward for one sample, keeping every state in `ws` (see sample_workspace_numel).
// Writes states[t * F + j] = sum_d h^t_j[d]. Leaves h^t at ws + t*F*D and a^t at ws + (L+t)*F*D.
template <typename T, typename Acc>
DAGFM_HD void sample_forward(Interaction kind, const T* h0_in, const T* p, const T* q, T* states,
                             Acc* ws, int F, int D, int L) {
  const int64_t FD = int64_t(F) * D;
  const int64_t layer_numel = FD * F * (kind == Interaction::Kernel ? D : 1);
  const int64_t q_layer_numel = FD * F;
  Acc* h0 = ws;
  for (int64_t k = 0; k < FD; ++k) h0[k] = Acc(h0_in[k]);
  if (states != nullptr)
    for (int j = 0; j < F; ++j) states[j] = T(sum(h0 + int64_t(j) * D, D));
  for (int t = 1; t <= L; ++t) {
    Acc* h_prev = ws + (t - 1) * FD;
    Acc* h = ws + t * FD;
    Acc* a = ws + (L + t) * FD;
    layer_forward(kind, p + (t - 1) * layer_numel, q == nullptr ? q : q + (t - 1) * q_layer_numel,
                  h0, h_prev, a, h, F, D);
    if (states != nullptr)
      for (int j = 0; j < F; ++j) states[int64_t(t) * F + j] = T(sum(h + int64_t(j) * D, D));
  }
}

// Backward for one sample. grad_states is this sample's (L+1, F) slice. grad_h0_out receives the
// full dLoss/dh0 (D-vectors per field); grad_p / grad_q accumulate into the caller's partial sums.
template <typename T, typename Acc>
DAGFM_HD void sample_backward(Interaction kind, const T* h0_in, const T* p, const T* q,
                              const T* grad_states, Acc* grad_h0, Acc* grad_p, Acc* grad_q, Acc* ws,
                              int F, int D, int L) {
  const int64_t FD = int64_t(F) * D;
  const int64_t layer_numel = FD * F * (kind == Interaction::Kernel ? D : 1);
  const int64_t q_layer_numel = FD * F;
  sample_forward<T, Acc>(kind, h0_in, p, q, static_cast<T*>(nullptr), ws, F, D, L);
  const Acc* h0 = ws;
  Acc* delta = ws + (2 * L + 1) * FD;
  Acc* delta_prev = delta + FD;
  Acc* alpha = delta_prev + FD;
  for (int64_t k = 0; k < FD; ++k) grad_h0[k] = Acc(0);
  for (int j = 0; j < F; ++j)
    for (int d = 0; d < D; ++d) delta[int64_t(j) * D + d] = Acc(grad_states[int64_t(L) * F + j]);
  for (int t = L; t >= 1; --t) {
    for (int j = 0; j < F; ++j)
      for (int d = 0; d < D; ++d)
        delta_prev[int64_t(j) * D + d] = Acc(grad_states[int64_t(t - 1) * F + j]);
    layer_backward(kind, p + (t - 1) * layer_numel, q == nullptr ? q : q + (t - 1) * q_layer_numel,
                   h0, ws + (t - 1) * FD, ws + (L + t) * FD, delta, delta_prev, alpha, grad_h0,
                   grad_p + (t - 1) * layer_numel,
                   grad_q == nullptr ? grad_q : grad_q + (t - 1) * q_layer_numel, F, D);
    Acc* tmp = delta;
    delta = delta_prev;
    delta_prev = tmp;
  }
  for (int64_t k = 0; k < FD; ++k) grad_h0[k] += delta[k];
}

}  // namespace dagfm
