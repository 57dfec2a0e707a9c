// Register-blocked CPU loops over a tile of samples, written with GCC/Clang vector extensions.
//
// A vector is kBytes wide (64 on AVX-512, 32 on AVX2; the caller's target attribute decides which
// instructions they become). Each block keeps its accumulators in registers and loads every weight
// vector once for several samples (and fields): the weights of a layer are the large operand, the
// tile's states are the small one.
//
// Layouts as in dagfm_math.h: a tile's (S, F, D) arrays row-major, sample s at s*F*D; one layer's
// weights p[i][j][d] (inner/outer, q likewise) or p[i][j][d][e] (kernel); only edges i <= j are read.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define DAGFM_CPU_VECTORS 1

#include <cstdint>
#include <type_traits>

#include "../dagfm_math.h"

// The helpers are always inlined, so passing vectors by value never crosses an ABI boundary.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#define DAGFM_UNROLL _Pragma("GCC unroll 32")

namespace dagfm {
namespace cpu {

template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int lanes = kBytes / int(sizeof(T));
};

template <typename V, typename T>
DAGFM_HD V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
DAGFM_HD void vstore(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Whether rows of kD values of T split into whole kBytes vectors, few enough to stay in registers.
template <typename T, int kBytes, int kD>
constexpr bool vectors_fit() {
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && kBytes > 0 && kD > 0 &&
         (kD * int(sizeof(T))) % kBytes == 0 && kD / Vec<T, kBytes>::lanes <= 4;
}

// Sum of the lanes by halving (a few shuffles, not one dependent add per lane).
template <typename T, int kBytes, typename V>
DAGFM_HD T lane_sum(const V& v) {
  if constexpr (kBytes > 16) {
    using Half = typename Vec<T, kBytes / 2>::type;
    Half lo, hi;
    __builtin_memcpy(&lo, &v, kBytes / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + kBytes / 2, kBytes / 2);
    return lane_sum<T, kBytes / 2>(lo + hi);
  } else {
    T s = T(0);
    DAGFM_UNROLL
    for (int k = 0; k < Vec<T, kBytes>::lanes; ++k) s += v[k];
    return s;
  }
}

template <int kM, int kJ, int kV, typename V>
DAGFM_HD void zero_all(V (&acc)[kM][kJ][kV]) {
  DAGFM_UNROLL
  for (int m = 0; m < kM; ++m)
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) acc[m][jj][v] = V{};
}

// Writes a_j and h_next_j = h0_j * a_j for the kM samples at s0 and fields [j0, j0 + kJ).
template <typename T, int kBytes, int kD, int kM, int kJ, typename V>
DAGFM_HD void store_messages(V (&acc)[kM][kJ][kD / Vec<T, kBytes>::lanes], const T* DAGFM_RESTRICT h0,
                             T* DAGFM_RESTRICT a, T* DAGFM_RESTRICT h_next, int64_t FD, int j0, int s0) {
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  DAGFM_UNROLL
  for (int m = 0; m < kM; ++m)
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        const int64_t o = (s0 + m) * FD + int64_t(j0 + jj) * kD + v * kW;
        vstore(a + o, acc[m][jj][v]);
        vstore(h_next + o, vload<V>(h0 + o) * acc[m][jj][v]);
      }
}

// Inner interaction, a_j = sum_{i<=j} p_ij * h_i for kM samples and kJ fields: per source field i,
// kJ weight vectors and kM state vectors feed kM * kJ FMAs.
template <typename T, int kBytes, int kD, int kM, int kJ>
DAGFM_HD void inner_forward_block(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT h0,
                                  const T* DAGFM_RESTRICT h_prev, T* DAGFM_RESTRICT a,
                                  T* DAGFM_RESTRICT h_next, int F, int j0, int s0) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const int64_t FD = int64_t(F) * kD;
  V acc[kM][kJ][kV];
  zero_all(acc);
  auto step = [&](int i, int first) __attribute__((always_inline)) {
    const T* w = p + (int64_t(i) * F + j0) * kD;
    const T* hi = h_prev + s0 * FD + int64_t(i) * kD;
    V wv[kJ][kV];
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) wv[jj][v] = jj >= first ? vload<V>(w + jj * kD + v * kW) : V{};
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        const V h = vload<V>(hi + m * FD + v * kW);
        DAGFM_UNROLL
        for (int jj = 0; jj < kJ; ++jj)
          if (jj >= first) acc[m][jj][v] += wv[jj][v] * h;
      }
  };
  // Sources i <= j0 reach every field of the block (the hot loop, no masking); i in
  // (j0, j0 + kJ) only the fields >= i (never multiplied by a missing edge: Inf * 0 is NaN).
  for (int i = 0; i <= j0; ++i) step(i, 0);
  for (int i = j0 + 1; i < j0 + kJ; ++i) step(i, i - j0);
  store_messages<T, kBytes, kD, kM, kJ>(acc, h0, a, h_next, FD, j0, s0);
}

// Outer interaction, a_j = sum_{i<=j} <p_ij, h_i> q_ij, for kM samples and one field j.
template <typename T, int kBytes, int kD, int kM>
DAGFM_HD void outer_forward_block(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q,
                                  const T* DAGFM_RESTRICT h0, const T* DAGFM_RESTRICT h_prev,
                                  T* DAGFM_RESTRICT a, T* DAGFM_RESTRICT h_next, int F, int j, int s0) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const int64_t FD = int64_t(F) * kD;
  V acc[kM][1][kV];
  zero_all(acc);
  for (int i = 0; i <= j; ++i) {
    const int64_t off = (int64_t(i) * F + j) * kD;
    V wv[kV], qv[kV];
    DAGFM_UNROLL
    for (int v = 0; v < kV; ++v) {
      wv[v] = vload<V>(p + off + v * kW);
      qv[v] = vload<V>(q + off + v * kW);
    }
    // The kM dot products first, so their reductions overlap.
    T c[kM];
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m) {
      const T* hi = h_prev + (s0 + m) * FD + int64_t(i) * kD;
      V prod = wv[0] * vload<V>(hi);
      DAGFM_UNROLL
      for (int v = 1; v < kV; ++v) prod += wv[v] * vload<V>(hi + v * kW);
      c[m] = lane_sum<T, kBytes>(prod);
    }
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) acc[m][0][v] += c[m] * qv[v];
  }
  store_messages<T, kBytes, kD, kM, 1>(acc, h0, a, h_next, FD, j, s0);
}

// Outer interaction for up to one vector of samples, sample s in lane s (the whole tile through
// all L layers): <p_ij, h_i> for every lane is D FMAs with p_ij[d] broadcast, no horizontal sums.
// hT, the h0 tile transposed: (F, kD) vectors. ws: 3 * F * kD vectors. Lanes >= n are padding.
template <typename T, int kBytes, int kD>
DAGFM_HD void outer_forward_lanes(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q, T* ws, int F,
                                  int L, int n, T* states, int64_t states_row, T* saved) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes;
  const int64_t FD = int64_t(F) * kD;
  T* h0 = ws;                      // (F, kD, kW), filled by the caller
  T* hbuf[2] = {ws + FD * kW, ws + 2 * FD * kW};
  auto write_states = [&](const T* h, int t) {
    for (int j = 0; j < F; ++j) {
      V s = vload<V>(h + int64_t(j) * kD * kW);
      for (int d = 1; d < kD; ++d) s += vload<V>(h + (int64_t(j) * kD + d) * kW);
      for (int lane = 0; lane < n; ++lane) states[lane * states_row + int64_t(t) * F + j] = s[lane];
    }
  };
  write_states(h0, 0);
  const T* h_prev = h0;
  const int64_t layer = FD * F;
  for (int t = 1; t <= L; ++t) {
    T* h = hbuf[t & 1];
    const T* pt = p + (t - 1) * layer;
    const T* qt = q + (t - 1) * layer;
    for (int j = 0; j < F; ++j) {
      V acc[kD];
      DAGFM_UNROLL
      for (int e = 0; e < kD; ++e) acc[e] = V{};
      for (int i = 0; i <= j; ++i) {
        const T* w = pt + (int64_t(i) * F + j) * kD;
        const T* qq = qt + (int64_t(i) * F + j) * kD;
        const T* hi = h_prev + int64_t(i) * kD * kW;
        // Four partial sums: the dot product is not one chain of kD dependent FMAs.
        V c[4] = {V{}, V{}, V{}, V{}};
        DAGFM_UNROLL
        for (int d = 0; d < kD; ++d) c[d % 4] += w[d] * vload<V>(hi + d * kW);
        const V dot = (c[0] + c[1]) + (c[2] + c[3]);
        DAGFM_UNROLL
        for (int e = 0; e < kD; ++e) acc[e] += qq[e] * dot;
      }
      DAGFM_UNROLL
      for (int e = 0; e < kD; ++e) {
        const int64_t o = (int64_t(j) * kD + e) * kW;
        vstore(h + o, vload<V>(h0 + o) * acc[e]);
        if (saved != nullptr)
          for (int lane = 0; lane < n; ++lane) saved[(int64_t(lane) * L + t - 1) * FD + int64_t(j) * kD + e] = acc[e][lane];
      }
    }
    write_states(h, t);
    h_prev = h;
  }
}

// Kernel interaction, a_j[e] = sum_{i<=j} sum_d h_i[d] p_ij[d][e], for kM samples and kJ fields:
// per (i, d), kJ weight rows (read in p's own layout) and kM broadcast states feed kM * kJ * kV FMAs.
// The blocks (i, j) with i > j are never read nor multiplied.
template <typename T, int kBytes, int kD, int kM, int kJ>
DAGFM_HD void kernel_forward_block(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT h0,
                                   const T* DAGFM_RESTRICT h_prev, T* DAGFM_RESTRICT a,
                                   T* DAGFM_RESTRICT h_next, int F, int j0, int s0) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  constexpr int64_t kDD = int64_t(kD) * kD;
  const int64_t FD = int64_t(F) * kD;
  V acc[kM][kJ][kV];
  zero_all(acc);
  auto step = [&](int i, int first) __attribute__((always_inline)) {
    const T* w = p + (int64_t(i) * F + j0) * kDD;
    const T* hi = h_prev + s0 * FD + int64_t(i) * kD;
    for (int d = 0; d < kD; ++d) {
      V wv[kJ][kV];
      DAGFM_UNROLL
      for (int jj = 0; jj < kJ; ++jj)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) wv[jj][v] = jj >= first ? vload<V>(w + jj * kDD + d * kD + v * kW) : V{};
      DAGFM_UNROLL
      for (int m = 0; m < kM; ++m) {
        const T h = hi[m * FD + d];
        DAGFM_UNROLL
        for (int jj = 0; jj < kJ; ++jj)
          DAGFM_UNROLL
          for (int v = 0; v < kV; ++v)
            if (jj >= first) acc[m][jj][v] += h * wv[jj][v];
      }
    }
  };
  // Sources i <= j0 reach every field of the block (the hot loop, no masking); i in
  // (j0, j0 + kJ) only the fields >= i.
  for (int i = 0; i <= j0; ++i) step(i, 0);
  for (int i = j0 + 1; i < j0 + kJ; ++i) step(i, i - j0);
  store_messages<T, kBytes, kD, kM, kJ>(acc, h0, a, h_next, FD, j0, s0);
}

}  // namespace cpu
}  // namespace dagfm

#pragma GCC diagnostic pop
#endif
