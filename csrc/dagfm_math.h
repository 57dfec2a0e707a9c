// What the CPU and CUDA backends share, without torch: the function attributes that let one
// function build for host and device (DAGFM_HD, DAGFM_RESTRICT), the dot / sum helpers, and the
// per-sample (and per-tile) DAG-propagation arithmetic that the CPU kernels run and that the CUDA
// host tests (tests/cuda_host) compare the CUDA algorithms against. `T` is the storage type of the
// weights, `Acc` the type the states and sums are kept in (float for float/half/bfloat16, double
// for double).
//
// Layouts for one sample: h0, h, a, delta are (F, D) row-major; one layer's weights are
// p[i][j][d] (inner/outer, and q likewise) or p[i][j][d][e] (kernel). Only edges i <= j exist.
#pragma once

#include "dagfm_params.h"

#include <type_traits>

#if defined(__CUDACC__)
#define DAGFM_HD __host__ __device__ __forceinline__
#define DAGFM_RESTRICT __restrict__
#elif defined(__GNUC__)
// Always inlined so that each ISA clone of a CPU caller (target_clones) compiles these for its ISA.
#define DAGFM_HD inline __attribute__((always_inline))
#define DAGFM_RESTRICT __restrict__
#else
#define DAGFM_HD inline
#define DAGFM_RESTRICT
#endif

// Lets the host compiler vectorise the short reductions over D without -ffast-math
// (built with -fopenmp or -fopenmp-simd; nvcc and compilers without them ignore the macros).
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

// Every per-sample (F, D) array below comes as a tile of S samples, sample s at offset s*F*D:
// the CPU runs tiles so that each weight it loads serves S samples; S = 1 is one sample.

// One layer forward: a_j = sum_{i<=j} message(i -> j), h_next_j = h0_j * a_j.
// kD > 0 fixes D at compile time: the accumulator of a_j then lives in registers.
template <typename T, typename Acc, int kD = 0>
DAGFM_HD void layer_forward(Interaction kind, const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q,
                            const Acc* DAGFM_RESTRICT h0, const Acc* DAGFM_RESTRICT h_prev,
                            Acc* DAGFM_RESTRICT a, Acc* DAGFM_RESTRICT h_next, int F, int D_arg,
                            int S = 1) {
  const int D = kD > 0 ? kD : D_arg;
  const int64_t FD = int64_t(F) * D;
  const int edge_numel = kind == Interaction::Kernel ? D * D : D;
  for (int j = 0; j < F; ++j) {
    for (int s = 0; s < S; ++s) {
      const int64_t oj = s * FD + int64_t(j) * D;
      Acc local[kD > 0 ? kD : 1];
      Acc* DAGFM_RESTRICT acc;
      if constexpr (kD > 0) acc = local; else acc = a + oj;
      for (int d = 0; d < D; ++d) acc[d] = Acc(0);
      const Acc* DAGFM_RESTRICT hs = h_prev + s * FD;
      for (int i = 0; i <= j; ++i) {
        const T* DAGFM_RESTRICT w = p + edge_offset(i, j, F, edge_numel);
        const Acc* DAGFM_RESTRICT hi = hs + int64_t(i) * D;
        if (kind == Interaction::Inner) {
          DAGFM_SIMD
          for (int d = 0; d < D; ++d) acc[d] += Acc(w[d]) * hi[d];
        } else if (kind == Interaction::Outer) {
          const Acc c = dot(w, hi, D);
          const T* DAGFM_RESTRICT qij = q + edge_offset(i, j, F, D);
          DAGFM_SIMD
          for (int e = 0; e < D; ++e) acc[e] += c * Acc(qij[e]);
        } else {
          for (int d = 0; d < D; ++d) {
            const Acc hd = hi[d];
            const T* DAGFM_RESTRICT wd = w + int64_t(d) * D;
            DAGFM_SIMD
            for (int e = 0; e < D; ++e) acc[e] += hd * Acc(wd[e]);
          }
        }
      }
      DAGFM_SIMD
      for (int d = 0; d < D; ++d) {
        a[oj + d] = acc[d];
        h_next[oj + d] = h0[oj + d] * acc[d];
      }
    }
  }
}

// One layer backward (t = the layer, h_prev = h^{t-1}, a = a^t).
//   delta      in : dLoss/dh^t
//   delta_prev in : G[t-1] broadcast over d;  out: dLoss/dh^{t-1}
//   alpha      scratch
//   grad_h0    accumulates delta * a
//   grad_p, grad_q accumulate the tile's weight gradients for the layer, samples in order
template <typename T, typename Acc, int kD = 0>
DAGFM_HD void layer_backward(Interaction kind, const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q,
                             const Acc* DAGFM_RESTRICT h0, const Acc* DAGFM_RESTRICT h_prev,
                             const Acc* DAGFM_RESTRICT a, const Acc* DAGFM_RESTRICT delta,
                             Acc* DAGFM_RESTRICT delta_prev, Acc* DAGFM_RESTRICT alpha,
                             Acc* DAGFM_RESTRICT grad_h0, Acc* DAGFM_RESTRICT grad_p,
                             Acc* DAGFM_RESTRICT grad_q, int F, int D_arg, int S = 1) {
  const int D = kD > 0 ? kD : D_arg;
  const int64_t FD = int64_t(F) * D;
  DAGFM_SIMD
  for (int64_t k = 0; k < S * FD; ++k) {
    alpha[k] = delta[k] * h0[k];
    grad_h0[k] += delta[k] * a[k];
  }
  const int edge_numel = kind == Interaction::Kernel ? D * D : D;
  for (int j = 0; j < F; ++j) {
    for (int i = 0; i <= j; ++i) {
      const int64_t off = edge_offset(i, j, F, edge_numel);
      const T* DAGFM_RESTRICT w = p + off;
      Acc* DAGFM_RESTRICT gw = grad_p + off;
      for (int s = 0; s < S; ++s) {
        const Acc* DAGFM_RESTRICT alj = alpha + s * FD + int64_t(j) * D;
        const Acc* DAGFM_RESTRICT hi = h_prev + s * FD + int64_t(i) * D;
        Acc* DAGFM_RESTRICT di = delta_prev + s * FD + int64_t(i) * D;
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
            Acc acc = Acc(0);
            DAGFM_SIMD_REDUCE(acc)
            for (int e = 0; e < D; ++e) {
              gwd[e] += hd * alj[e];
              acc += Acc(wd[e]) * alj[e];
            }
            di[d] += acc;
          }
        }
      }
    }
  }
}

// Workspace a tile of S samples needs, in Acc elements: h^0..h^L, a^1..a^L, delta,
// delta_prev, alpha.
DAGFM_HD int64_t tile_workspace_numel(int F, int D, int L, int S = 1) {
  return int64_t(S) * F * D * (2 * L + 4);
}

// Forward for a tile of S consecutive samples (h0_in: S rows of F*D; states: S rows of (L+1)*F,
// or nullptr), keeping every state in `ws`: h^t at ws + t*S*F*D, a^t at ws + (L+t)*S*F*D.
// saved_a (or nullptr) receives the messages a^1..a^L as S rows of (L, F, D).
template <typename T, typename Acc, int kD = 0>
DAGFM_HD void tile_forward(Interaction kind, const T* h0_in, const T* p, const T* q, T* states,
                           Acc* ws, int F, int D, int L, int S = 1, T* saved_a = nullptr) {
  const int64_t FD = int64_t(F) * D, SFD = S * FD;
  const int64_t layer_numel = FD * F * (kind == Interaction::Kernel ? D : 1);
  const int64_t q_layer_numel = FD * F;
  const int64_t states_row = int64_t(L + 1) * F;
  Acc* h0 = ws;
  for (int64_t k = 0; k < SFD; ++k) h0[k] = Acc(h0_in[k]);
  for (int t = 0; t <= L; ++t) {
    Acc* h = ws + t * SFD;
    if (t > 0)
      layer_forward<T, Acc, kD>(kind, p + (t - 1) * layer_numel,
                    q == nullptr ? q : q + (t - 1) * q_layer_numel, h0, ws + (t - 1) * SFD,
                    ws + (L + t) * SFD, h, F, D, S);
    if (states != nullptr)
      for (int s = 0; s < S; ++s)
        for (int j = 0; j < F; ++j)
          states[s * states_row + int64_t(t) * F + j] = T(sum(h + s * FD + int64_t(j) * D, D));
    if (saved_a != nullptr && t > 0)
      for (int s = 0; s < S; ++s)
        for (int64_t k = 0; k < FD; ++k)
          saved_a[(int64_t(s) * L + t - 1) * FD + k] = T(ws[(L + t) * SFD + s * FD + k]);
  }
}

// out[s, j, :] = grad_states[s, t, j] (G[t] broadcast over d), plus grad_sum[s, j, :] when given
// (z = h^0 + ... + h^L reads every h^t).
template <typename T, typename Acc>
DAGFM_HD void broadcast_grad_states(const T* grad_states, int t, Acc* out, int F, int D, int L,
                                    int S, const T* grad_sum = nullptr) {
  const int64_t FD = int64_t(F) * D, states_row = int64_t(L + 1) * F;
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < F; ++j) {
      const Acc g = Acc(grad_states[s * states_row + int64_t(t) * F + j]);
      const int64_t o = s * FD + int64_t(j) * D;
      for (int d = 0; d < D; ++d) out[o + d] = grad_sum == nullptr ? g : g + Acc(grad_sum[o + d]);
    }
}

// Backward for a tile of S consecutive samples. grad_states: S rows of (L+1)*F. grad_h0 receives
// the full dLoss/dh0 (S rows of F*D); grad_p / grad_q accumulate into the caller's partial sums.
// saved_a: the forward's messages (S rows of (L, F, D)), or nullptr to recompute them.
// grad_sum: dLoss/dz (S rows of F*D), or nullptr.
template <typename T, typename Acc, int kD = 0>
DAGFM_HD void tile_backward(Interaction kind, const T* h0_in, const T* p, const T* q,
                            const T* grad_states, Acc* grad_h0, Acc* grad_p, Acc* grad_q, Acc* ws,
                            int F, int D, int L, int S = 1, const T* saved_a = nullptr,
                            const T* grad_sum = nullptr) {
  const int64_t FD = int64_t(F) * D, SFD = S * FD;
  const int64_t layer_numel = FD * F * (kind == Interaction::Kernel ? D : 1);
  const int64_t q_layer_numel = FD * F;
  if (saved_a == nullptr) {
    tile_forward<T, Acc, kD>(kind, h0_in, p, q, static_cast<T*>(nullptr), ws, F, D, L, S);
  } else {  // the forward kept a^t: h^t = h0 * a^t, no layer products
    for (int64_t k = 0; k < SFD; ++k) ws[k] = Acc(h0_in[k]);
    for (int t = 1; t <= L; ++t)
      for (int s = 0; s < S; ++s)
        for (int64_t k = 0; k < FD; ++k) {
          const Acc a = Acc(saved_a[(int64_t(s) * L + t - 1) * FD + k]);
          ws[(L + t) * SFD + s * FD + k] = a;
          ws[t * SFD + s * FD + k] = ws[s * FD + k] * a;
        }
  }
  const Acc* h0 = ws;
  Acc* delta = ws + (2 * L + 1) * SFD;
  Acc* delta_prev = delta + SFD;
  Acc* alpha = delta_prev + SFD;
  for (int64_t k = 0; k < SFD; ++k) grad_h0[k] = Acc(0);
  broadcast_grad_states(grad_states, L, delta, F, D, L, S, grad_sum);
  for (int t = L; t >= 1; --t) {
    broadcast_grad_states(grad_states, t - 1, delta_prev, F, D, L, S, grad_sum);
    layer_backward<T, Acc, kD>(kind, p + (t - 1) * layer_numel, q == nullptr ? q : q + (t - 1) * q_layer_numel,
                   h0, ws + (t - 1) * SFD, ws + (L + t) * SFD, delta, delta_prev, alpha, grad_h0,
                   grad_p + (t - 1) * layer_numel,
                   grad_q == nullptr ? grad_q : grad_q + (t - 1) * q_layer_numel, F, D, S);
    Acc* tmp = delta;
    delta = delta_prev;
    delta_prev = tmp;
  }
  for (int64_t k = 0; k < SFD; ++k) grad_h0[k] += delta[k];
}

}  // namespace dagfm
