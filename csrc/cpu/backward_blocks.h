// Register-blocked CPU loops of the backward (vector extensions as in vec.h): weight gradients and
// delta_prev for one layer of a tile of samples.
#pragma once

#include "backward_prefetch.h"
#include "vec.h"

#ifdef DAGFM_CPU_VECTORS
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dagfm {
namespace cpu {

// Makes the compiler load v once into a register for its two uses, instead of folding the load
// into both FMAs: two loads per two FMAs would leave the load ports, not the FMAs, the limit.
template <typename V>
DAGFM_HD void keep_in_register(V& v) {
#if defined(__x86_64__)
  __asm__("" : "+v"(v));
#else
  (void)v;
#endif
}

// Inner backward for the target fields [j0, j0 + kJ) of a tile of S samples: for every source
// i <= j, dP_ij += sum_s alpha_j h_i and delta_prev_i += P_ij alpha_j. The kJ weight-gradient
// vectors of a source stay in registers across all S samples (one read-modify-write of grad_p per
// tile), next to kB samples' h_i and delta_prev_i; the block's alpha (S, kJ, kD), written by the
// caller, stays in L1 across the sources. The block's own fields i >= j0 first appear as sources
// here (the blocks run in increasing j0): their delta_prev_i starts from G[t-1, i] broadcast
// (grad_prev: the tile's first sample's row t-1 of the states' gradient, samples states_row
// apart) plus dLoss/dz_i where grad_sum is given (rows of F*kD).
template <typename T, int kBytes, int kD, int kJ, int kB>
DAGFM_HD void inner_backward_block(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT h_prev,
                                   const T* DAGFM_RESTRICT alpha, T* DAGFM_RESTRICT delta_prev,
                                   T* DAGFM_RESTRICT grad_p, const T* DAGFM_RESTRICT grad_prev,
                                   int64_t states_row, const T* DAGFM_RESTRICT grad_sum, int F, int j0, int S,
                                   LinePrefetcher& prefetch) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const int64_t FD = int64_t(F) * kD;
  auto source = [&]<bool kStart>(int i, int first) __attribute__((always_inline)) {
    prefetch.step(kJ);
    const int64_t off = (int64_t(i) * F + j0) * kD;
    V wv[kJ][kV], gw[kJ][kV];
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        wv[jj][v] = jj >= first ? vload<V>(p + off + jj * kD + v * kW) : V{};
        gw[jj][v] = V{};
      }
    // Offsets from per-group pointers: the alpha offsets are constants (no index arithmetic per
    // load, which int indices under -fwrapv would need).
    auto samples = [&]<int kM>(int s0) __attribute__((always_inline)) {
      const int64_t row0 = s0 * FD + int64_t(i) * kD;
      const T* hs = h_prev + row0;
      T* ds = delta_prev + row0;
      const T* as = alpha + int64_t(s0) * (kJ * kD);
      V hv[kM][kV], dv[kM][kV];
      DAGFM_UNROLL
      for (int m = 0; m < kM; ++m)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) {
          hv[m][v] = vload<V>(hs + m * FD + v * kW);
          if constexpr (kStart) {
            // 0 + x, not x - 0: GCC builds the latter one lane at a time.
            dv[m][v] = V{} + grad_prev[(s0 + m) * states_row + i];
            if (grad_sum != nullptr) dv[m][v] += vload<V>(grad_sum + row0 + m * FD + v * kW);
          } else {
            dv[m][v] = vload<V>(ds + m * FD + v * kW);
          }
        }
      DAGFM_UNROLL
      for (int jj = 0; jj < kJ; ++jj)
        DAGFM_UNROLL
        for (int m = 0; m < kM; ++m)
          DAGFM_UNROLL
          for (int v = 0; v < kV; ++v)
            if (jj >= first) {
              V al = vload<V>(as + (m * kJ + jj) * kD + v * kW);
              keep_in_register(al);
              gw[jj][v] += al * hv[m][v];
              dv[m][v] += wv[jj][v] * al;
            }
      DAGFM_UNROLL
      for (int m = 0; m < kM; ++m)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) vstore(ds + m * FD + v * kW, dv[m][v]);
    };
    int s0 = 0;
    for (; s0 + kB <= S; s0 += kB) samples.template operator()<kB>(s0);
    for (; s0 < S; ++s0) samples.template operator()<1>(s0);
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v)
        if (jj >= first) {
          T* g = grad_p + off + jj * kD + v * kW;
          vstore(g, vload<V>(g) + gw[jj][v]);
        }
  };
  // Sources i < j0 reach every field of the block (the hot loop, no masking); i in
  // [j0, j0 + kJ) only the fields >= i (the edges below the diagonal are never read).
  for (int i = 0; i < j0; ++i) source.template operator()<false>(i, 0);
  for (int i = j0; i < j0 + kJ; ++i) source.template operator()<true>(i, i - j0);
}

// Outer backward, first half, for up to one vector of samples in lanes: C[i][j] = <p_ij, h_i> and
// R[i][j] = <q_ij, alpha_j> for every edge, each an (F, F) array of vectors (lane = sample).
// hT, aT: h_prev and alpha transposed, (F, kD) vectors. The kD vectors of h_i (for C) or alpha_j
// (for R) stay in registers while kE edges at a time take p_ij[d] (q_ij[d]) broadcast: one load
// per FMA. Each source or target steps `prefetch` by its edge count.
template <typename T, int kBytes, int kD>
DAGFM_HD void outer_edge_dots_lanes(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q,
                                    const T* DAGFM_RESTRICT hT, const T* DAGFM_RESTRICT aT,
                                    T* DAGFM_RESTRICT C, T* DAGFM_RESTRICT R, int F, LinePrefetcher& prefetch) {
  using V = typename Vec<T, kBytes>::type;
  // kE accumulators beside the kD vectors of x: 8 with AVX-512's 32 registers, 4 with AVX2's 16.
  constexpr int kW = Vec<T, kBytes>::lanes, kE = kBytes >= 64 ? 8 : 4;
  // out[edge(e)] = sum_d w[edge(e)][d] * x[d] for the edges e of [e0, e1), kE at a time.
  auto dots = [&](const V (&x)[kD], const T* w, T* out, int e0, int e1, auto&& edge) __attribute__((always_inline)) {
    auto run = [&]<int kN>(int e) __attribute__((always_inline)) {
      V acc[kN];
      DAGFM_UNROLL
      for (int n = 0; n < kN; ++n) acc[n] = V{};
      DAGFM_UNROLL
      for (int d = 0; d < kD; ++d)
        DAGFM_UNROLL
        for (int n = 0; n < kN; ++n) acc[n] += w[edge(e + n) * kD + d] * x[d];
      DAGFM_UNROLL
      for (int n = 0; n < kN; ++n) vstore(out + edge(e + n) * kW, acc[n]);
    };
    int e = e0;
    for (; e + kE <= e1; e += kE) run.template operator()<kE>(e);
    for (; e < e1; ++e) run.template operator()<1>(e);
  };
  V x[kD];
  for (int i = 0; i < F; ++i) {
    prefetch.step(F - i);
    DAGFM_UNROLL
    for (int d = 0; d < kD; ++d) x[d] = vload<V>(hT + (int64_t(i) * kD + d) * kW);
    dots(x, p, C, i, F, [&](int j) __attribute__((always_inline)) { return int64_t(i) * F + j; });
  }
  for (int j = 0; j < F; ++j) {
    prefetch.step(j + 1);
    DAGFM_UNROLL
    for (int d = 0; d < kD; ++d) x[d] = vload<V>(aT + (int64_t(j) * kD + d) * kW);
    dots(x, q, R, 0, j + 1, [&](int i) __attribute__((always_inline)) { return int64_t(i) * F + j; });
  }
}

// Outer backward, second half, for the n <= kW samples from s0 whose dot products sit in the lanes
// of C / R (kW per edge), rows of kD values in vectors of kBytes:
//   dP_ij += sum_s R_ij[s] h_s,i   (per source i: the kW rows h_s,i in registers, kE edges at a time)
//   delta_prev_s,i = G[t-1, i] (+ dLoss/dz_i) + sum_j R_ij[s] p_ij   (per source i: the kW rows in
//     registers; grad_prev: the states' gradient row t-1 of sample 0, samples states_row apart;
//     grad_sum: rows of F*kD, or nullptr)
//   dQ_ij += sum_s C_ij[s] alpha_s,j   (per target j: the kW rows alpha_s,j in registers)
// each FMA with one broadcast load. Each source or target steps `prefetch` by its edge count.
template <typename T, int kBytes, int kD, int kW>
DAGFM_HD void outer_backward_lanes(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT h_prev,
                                   const T* DAGFM_RESTRICT alpha, const T* DAGFM_RESTRICT C,
                                   const T* DAGFM_RESTRICT R, T* DAGFM_RESTRICT delta_prev,
                                   const T* DAGFM_RESTRICT grad_prev, int64_t states_row,
                                   const T* DAGFM_RESTRICT grad_sum, T* DAGFM_RESTRICT grad_p,
                                   T* DAGFM_RESTRICT grad_q, int F, int s0, int n, LinePrefetcher& prefetch) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kWR = Vec<T, kBytes>::lanes, kV = kD / kWR, kE = 8 / kV;
  const int64_t FD = int64_t(F) * kD;
  auto load_rows = [&](V (&x)[kW][kV], const T* base) __attribute__((always_inline)) {
    DAGFM_UNROLL
    for (int s = 0; s < kW; ++s)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) x[s][v] = s < n ? vload<V>(base + (s0 + s) * FD + v * kWR) : V{};
  };
  // g[edge(e)] += sum_s dots[edge(e)][s] * x[s] for the edges e of [e0, e1), kE at a time.
  auto weight_grads = [&](const V (&x)[kW][kV], const T* dots, T* g, int e0, int e1, auto&& edge)
      __attribute__((always_inline)) {
    auto run = [&]<int kN>(int e) __attribute__((always_inline)) {
      V acc[kN][kV];
      DAGFM_UNROLL
      for (int m = 0; m < kN; ++m)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) acc[m][v] = V{};
      DAGFM_UNROLL
      for (int s = 0; s < kW; ++s)
        DAGFM_UNROLL
        for (int m = 0; m < kN; ++m)
          DAGFM_UNROLL
          for (int v = 0; v < kV; ++v) acc[m][v] += dots[edge(e + m) * kW + s] * x[s][v];
      DAGFM_UNROLL
      for (int m = 0; m < kN; ++m)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) {
          T* gv = g + edge(e + m) * kD + v * kWR;
          vstore(gv, vload<V>(gv) + acc[m][v]);
        }
    };
    int e = e0;
    for (; e + kE <= e1; e += kE) run.template operator()<kE>(e);
    for (; e < e1; ++e) run.template operator()<1>(e);
  };
  V x[kW][kV];
  for (int i = 0; i < F; ++i) {
    prefetch.step(F - i);
    auto edge = [&](int j) __attribute__((always_inline)) { return int64_t(i) * F + j; };
    load_rows(x, h_prev + int64_t(i) * kD);
    weight_grads(x, R, grad_p, i, F, edge);
    // delta_prev_i starts from G[t-1, i] (+ dLoss/dz_i); every source is visited once.
    DAGFM_UNROLL
    for (int s = 0; s < kW; ++s)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        x[s][v] = V{};
        if (s < n) {
          x[s][v] += grad_prev[(s0 + s) * states_row + i];
          if (grad_sum != nullptr) x[s][v] += vload<V>(grad_sum + (s0 + s) * FD + int64_t(i) * kD + v * kWR);
        }
      }
    for (int j = i; j < F; ++j) {
      V w[kV];
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) w[v] = vload<V>(p + edge(j) * kD + v * kWR);
      DAGFM_UNROLL
      for (int s = 0; s < kW; ++s)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) x[s][v] += R[edge(j) * kW + s] * w[v];
    }
    DAGFM_UNROLL
    for (int s = 0; s < kW; ++s)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v)
        if (s < n) vstore(delta_prev + (s0 + s) * FD + int64_t(i) * kD + v * kWR, x[s][v]);
  }
  for (int j = 0; j < F; ++j) {
    prefetch.step(j + 1);
    load_rows(x, alpha + int64_t(j) * kD);
    weight_grads(x, C, grad_q, 0, j + 1, [&](int i) __attribute__((always_inline)) { return int64_t(i) * F + j; });
  }
}

// Outer backward for one sample s (where the samples-in-lanes loops do not run): weight gradients
// and delta_prev by source field i, h_i and the running delta_prev_i in registers across the
// targets j >= i.
template <typename T, int kBytes, int kD>
DAGFM_HD void outer_backward_sample(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q,
                                    const T* DAGFM_RESTRICT h_prev, const T* DAGFM_RESTRICT alpha,
                                    T* DAGFM_RESTRICT delta_prev, T* DAGFM_RESTRICT grad_p,
                                    T* DAGFM_RESTRICT grad_q, int F, int s) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const int64_t FD = int64_t(F) * kD;
  for (int i = 0; i < F; ++i) {
    V hv[kV], dv[kV];
    DAGFM_UNROLL
    for (int v = 0; v < kV; ++v) {
      const int64_t o = s * FD + int64_t(i) * kD + v * kW;
      hv[v] = vload<V>(h_prev + o);
      dv[v] = vload<V>(delta_prev + o);
    }
    for (int j = i; j < F; ++j) {
      const int64_t off = (int64_t(i) * F + j) * kD;
      const T* al = alpha + s * FD + int64_t(j) * kD;
      V wv[kV], qv[kV], av[kV];
      V cp = V{}, rp = V{};
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        wv[v] = vload<V>(p + off + v * kW);
        qv[v] = vload<V>(q + off + v * kW);
        av[v] = vload<V>(al + v * kW);
        cp += wv[v] * hv[v];
        rp += qv[v] * av[v];
      }
      const T c = lane_sum<T, kBytes>(cp), r = lane_sum<T, kBytes>(rp);
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        T* gq = grad_q + off + v * kW;
        T* gp = grad_p + off + v * kW;
        vstore(gq, vload<V>(gq) + c * av[v]);
        vstore(gp, vload<V>(gp) + r * hv[v]);
        dv[v] += r * wv[v];
      }
    }
    DAGFM_UNROLL
    for (int v = 0; v < kV; ++v) vstore(delta_prev + s * FD + int64_t(i) * kD + v * kW, dv[v]);
  }
}

}  // namespace cpu
}  // namespace dagfm

#pragma GCC diagnostic pop
#endif
