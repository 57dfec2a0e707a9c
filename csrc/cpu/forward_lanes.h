// The outer interaction's forward with samples in vector lanes (vector extensions as in vec.h):
// a lane group's samples through all L layers, with broadcast weights and no horizontal sums. The
// register blocks of the other paths are in forward_blocks.h.
#pragma once

#include <cstdint>

#include "../dagfm_math.h"

namespace dagfm {
namespace cpu {

// Elements of one lane group's buffers in outer_forward_lanes: h0, two h buffers, a, z (each
// (F, D) vectors of kW lanes) and the (F, F) edge dots.
DAGFM_HD int64_t outer_lane_group_numel(int F, int D, int kW) {
  return (5 * int64_t(F) * D + int64_t(F) * F) * kW;
}

}  // namespace cpu
}  // namespace dagfm

#include "vec.h"

#ifdef DAGFM_CPU_VECTORS
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dagfm {
namespace cpu {

// Outer interaction for kG vectors of samples (n <= kG * kW of them, sample s in lane s % kW of group
// s / kW; the lanes past n are zero) through all L layers: per layer first every edge's dot product
// c_ij = <p_ij, h_i> (kE edges of every group at a time, p_ij[d] broadcast), then
// a_j = sum_{i<=j} c_ij q_ij (kAcc of its vectors of every group at a time, q_ij[e] broadcast).
// Each broadcast weight feeds kG FMAs, and there are no horizontal sums.
// h0: the samples' rows (F*kD apart); states, saved (rows L*F*kD apart, layer 0's messages) and z
// (rows F*kD apart) likewise from the first sample; saved and z may be nullptr.
// ws: kG lane groups' buffers, outer_lane_group_numel apart.
template <typename T, int kBytes, int kD, int kG, int kE, int kAcc>
DAGFM_HD void outer_forward_lanes(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q, const T* h0, int n,
                                  int F, int L, T* ws, T* states, int64_t states_row, T* saved, T* z) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes;
  const int64_t FD = int64_t(F) * kD, VFD = FD * kW, GS = outer_lane_group_numel(F, kD, kW);
  T* h0T = ws;
  T* hbuf[2] = {ws + VFD, ws + 2 * VFD};
  T* aT = ws + 3 * VFD;  // messages, then the per-field state sums
  T* zT = ws + 4 * VFD;
  T* C = ws + 5 * VFD;
  auto lanes_in = [&](int g) __attribute__((always_inline)) { return n - g * kW < kW ? n - g * kW : kW; };
  for (int g = 0; g < kG; ++g) {
    const int m = lanes_in(g);
    rows_to_lanes<T, kBytes>(h0 + g * kW * FD, FD, m > 0 ? m : 0, FD, h0T + g * GS);
  }
  // Group g's rows of the (B, ...) output at `rows` (row_stride apart) from its lanes, K per sample.
  // stream: outputs read only after the call (saved, z), so non-temporal stores (vstream).
  auto to_rows = [&](const T* lanes, int64_t K, T* rows, int64_t row_stride, bool stream = false)
                     __attribute__((always_inline)) {
    for (int g = 0; g < kG && lanes_in(g) > 0; ++g)
      lanes_to_rows<T, kBytes>(lanes + g * GS, K, lanes_in(g), rows + g * kW * row_stride, row_stride, stream);
  };
  // s_j = sum_e h_j[e] for every field into aT's first F vectors, then out to the states of layer t.
  auto write_states = [&](const T* hT, int t) __attribute__((always_inline)) {
    for (int g = 0; g < kG; ++g)
      for (int j = 0; j < F; ++j) {
        V sv[2] = {V{}, V{}};
        DAGFM_UNROLL
        for (int e = 0; e < kD; ++e) sv[e & 1] += vload<V>(hT + g * GS + (int64_t(j) * kD + e) * kW);
        vstore(aT + g * GS + int64_t(j) * kW, sv[0] + sv[1]);
      }
    to_rows(aT, F, states + int64_t(t) * F, states_row);
  };
  write_states(h0T, 0);
  if (z != nullptr && L == 0) to_rows(h0T, FD, z, FD);
  const T* h_prev = h0T;
  const int64_t layer = FD * F;
  for (int t = 1; t <= L; ++t) {
    T* h = hbuf[t & 1];
    const T* pt = p + (t - 1) * layer;
    const T* qt = q + (t - 1) * layer;
    // c_ij for the edges (i, j..j+kEb) of every group, one chain of FMAs over d per dot.
    auto dots = [&]<int kEb>(int i, int j) __attribute__((always_inline)) {
      const T* w = pt + (int64_t(i) * F + j) * kD;
      const T* hi = h_prev + int64_t(i) * kD * kW;
      V c[kEb][kG];
      DAGFM_UNROLL
      for (int e = 0; e < kEb; ++e)
        DAGFM_UNROLL
        for (int g = 0; g < kG; ++g) c[e][g] = V{};
      DAGFM_UNROLL
      for (int d = 0; d < kD; ++d) {
        V hv[kG];
        DAGFM_UNROLL
        for (int g = 0; g < kG; ++g) hv[g] = vload<V>(hi + g * GS + d * kW);
        DAGFM_UNROLL
        for (int e = 0; e < kEb; ++e) {
          const T wd = w[e * kD + d];
          DAGFM_UNROLL
          for (int g = 0; g < kG; ++g) c[e][g] += wd * hv[g];
        }
      }
      DAGFM_UNROLL
      for (int e = 0; e < kEb; ++e)
        DAGFM_UNROLL
        for (int g = 0; g < kG; ++g) vstore(C + g * GS + (int64_t(i) * F + j + e) * kW, c[e][g]);
    };
    for (int i = 0; i < F; ++i) {
      int j = i;
      for (; j + kE <= F; j += kE) dots.template operator()<kE>(i, j);
      if constexpr (kE > 4)
        for (; j + 4 <= F; j += 4) dots.template operator()<4>(i, j);
      for (; j < F; ++j) dots.template operator()<1>(i, j);
    }
    // a_j, kAcc of its kD vectors of every group at a time in registers.
    for (int j = 0; j < F; ++j)
      for (int e0 = 0; e0 < kD; e0 += kAcc) {
        V acc[kAcc][kG];
        DAGFM_UNROLL
        for (int e = 0; e < kAcc; ++e)
          DAGFM_UNROLL
          for (int g = 0; g < kG; ++g) acc[e][g] = V{};
        for (int i = 0; i <= j; ++i) {
          V c[kG];
          DAGFM_UNROLL
          for (int g = 0; g < kG; ++g) c[g] = vload<V>(C + g * GS + (int64_t(i) * F + j) * kW);
          const T* qq = qt + (int64_t(i) * F + j) * kD + e0;
          DAGFM_UNROLL
          for (int e = 0; e < kAcc; ++e)
            DAGFM_UNROLL
            for (int g = 0; g < kG; ++g) acc[e][g] += qq[e] * c[g];
        }
        DAGFM_UNROLL
        for (int e = 0; e < kAcc; ++e)
          DAGFM_UNROLL
          for (int g = 0; g < kG; ++g) {
            const int64_t o = g * GS + (int64_t(j) * kD + e0 + e) * kW;
            const V x = vload<V>(h0T + o), hv = x * acc[e][g];
            vstore(h + o, hv);
            if (saved != nullptr) vstore(aT + o, acc[e][g]);
            if (z != nullptr) vstore(zT + o, (t == 1 ? x : vload<V>(zT + o)) + hv);
          }
      }
    if (saved != nullptr) to_rows(aT, FD, saved + (t - 1) * FD, L * FD, true);
    write_states(h, t);
    h_prev = h;
  }
  if (z != nullptr && L > 0) to_rows(zT, FD, z, FD, true);
}

}  // namespace cpu
}  // namespace dagfm

#pragma GCC diagnostic pop
#endif
