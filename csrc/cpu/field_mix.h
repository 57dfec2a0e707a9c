// The field mixing h0[b] = C x[b] (C: (F, F), x[b]: (F, D) row-major) and its backward,
// grad_x[b] = C^T g[b] and grad_C = sum_b g[b] x[b]^T, over raw pointers (no torch).
//
// Both directions work on tiles of samples whose rows are R values long, R a multiple of the
// vector's lanes (R = D where D allows it, else the tile is copied into zero-padded rows).
// - mix_tile: every (sample, row vector) pair is a column; a register block of kJ output rows x
//   kN columns reads each broadcast C[j][k] for kN columns and each x vector for kJ rows.
// - gram_tile: grad_C's (j, k) entry summed over the tile's samples and row vectors in a vector
//   accumulator per (j, k) (lanes = embedding dims), kJ x kK of them in registers at a time; the
//   lanes are summed once per gradient chunk (gram_lane_sums), not per tile.
// Rows past F in a block are clamped to F - 1 and their results dropped, so any F works with one
// block shape. The scalar loops (mix_rows_scalar, gram_rows_scalar) serve the portable build.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../dagfm_math.h"
#include "vec.h"

namespace dagfm {
namespace cpu {

// out[s] = C x[s] for S samples of (F, D) rows; C row-major (F, F).
template <typename T>
void mix_rows_scalar(const T* DAGFM_RESTRICT C, const T* DAGFM_RESTRICT x, T* DAGFM_RESTRICT out,
                     int64_t S, int F, int D) {
  const int64_t FD = int64_t(F) * D;
  for (int64_t s = 0; s < S; ++s)
    for (int j = 0; j < F; ++j) {
      T* o = out + s * FD + int64_t(j) * D;
      for (int d = 0; d < D; ++d) o[d] = T(0);
      for (int k = 0; k < F; ++k) {
        const T c = C[int64_t(j) * F + k];
        const T* xr = x + s * FD + int64_t(k) * D;
        DAGFM_SIMD
        for (int d = 0; d < D; ++d) o[d] += c * xr[d];
      }
    }
}

// grad_c[j][k] += sum_s <g[s][j], x[s][k]> for S samples of (F, D) rows.
template <typename T>
void gram_rows_scalar(const T* DAGFM_RESTRICT g, const T* DAGFM_RESTRICT x, T* DAGFM_RESTRICT grad_c,
                      int64_t S, int F, int D) {
  const int64_t FD = int64_t(F) * D;
  for (int64_t s = 0; s < S; ++s)
    for (int j = 0; j < F; ++j)
      for (int k = 0; k < F; ++k)
        grad_c[int64_t(j) * F + k] += dot(g + s * FD + int64_t(j) * D, x + s * FD + int64_t(k) * D, D);
}

#ifdef DAGFM_CPU_VECTORS

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// Register blocks per vector width: accumulators plus the vectors that feed them fit the register
// file (32 vectors with AVX-512, 16 below).
template <int kBytes>
struct MixBlocking {
  static constexpr int kMixRows = 3;                     // output rows j of mix_tile
  static constexpr int kMixCols = kBytes >= 64 ? 8 : 4;  // (sample, row vector) columns
  static constexpr int kMixRowsOneColumn = 8;            // rows of a single column's block
  static constexpr int kGramRows = kBytes >= 64 ? 4 : 3; // j of gram_tile
  static constexpr int kGramCols = kBytes >= 64 ? 6 : 4; // k of gram_tile
};

// Output rows [0, F) of kN columns (xc: where column n's row 0 starts, rows R apart; oc likewise):
// a block of kJ rows x kN columns at a time, C[j][k] broadcast, each x vector read once per block.
template <typename T, int kBytes, int kJ, int kN>
DAGFM_HD void mix_columns(const T* DAGFM_RESTRICT C, int F, int R, const T* const (&xc)[kN], T* const (&oc)[kN]) {
  using V = typename Vec<T, kBytes>::type;
  for (int j0 = 0; j0 < F; j0 += kJ) {
    int rows[kJ];
    DAGFM_UNROLL
    for (int a = 0; a < kJ; ++a) rows[a] = std::min(j0 + a, F - 1);
    V acc[kJ][kN];
    DAGFM_UNROLL
    for (int a = 0; a < kJ; ++a)
      DAGFM_UNROLL
      for (int n = 0; n < kN; ++n) acc[a][n] = V{};
    for (int k = 0; k < F; ++k) {
      T c[kJ];
      DAGFM_UNROLL
      for (int a = 0; a < kJ; ++a) c[a] = C[int64_t(rows[a]) * F + k];
      DAGFM_UNROLL
      for (int n = 0; n < kN; ++n) {
        const V xv = vload<V>(xc[n] + int64_t(k) * R);
        DAGFM_UNROLL
        for (int a = 0; a < kJ; ++a) acc[a][n] += c[a] * xv;
      }
    }
    DAGFM_UNROLL
    for (int a = 0; a < kJ; ++a)
      if (j0 + a < F)
        DAGFM_UNROLL
        for (int n = 0; n < kN; ++n) vstore(oc[n] + int64_t(j0 + a) * R, acc[a][n]);
  }
}

// out[s] = C x[s] for the S samples of a tile: x and out hold S x F rows of R values (R a multiple
// of the lanes). Columns are (sample, row vector) pairs: blocks of kMixCols, the rest one by one
// (a single sample does no padded work).
template <typename T, int kBytes>
DAGFM_HD void mix_tile(const T* DAGFM_RESTRICT C, int F, int R, const T* x, T* out, int64_t S) {
  constexpr int kW = Vec<T, kBytes>::lanes;
  constexpr int kJ = MixBlocking<kBytes>::kMixRows, kN = MixBlocking<kBytes>::kMixCols;
  constexpr int kJ1 = MixBlocking<kBytes>::kMixRowsOneColumn;
  const int nv = R / kW;
  const int64_t FR = int64_t(F) * R, ncols = S * nv;
  auto offset = [&](int64_t c) __attribute__((always_inline)) { return c / nv * FR + c % nv * kW; };
  int64_t c0 = 0;
  for (; c0 + kN <= ncols; c0 += kN) {
    const T* xc[kN];
    T* oc[kN];
    DAGFM_UNROLL
    for (int n = 0; n < kN; ++n) {
      xc[n] = x + offset(c0 + n);
      oc[n] = out + offset(c0 + n);
    }
    mix_columns<T, kBytes, kJ, kN>(C, F, R, xc, oc);
  }
  for (; c0 < ncols; ++c0) {
    const T* xc[1] = {x + offset(c0)};
    T* oc[1] = {out + offset(c0)};
    mix_columns<T, kBytes, kJ1, 1>(C, F, R, xc, oc);
  }
}

// acc[j * F + k] (vectors) += g[s][j] * x[s][k] over the S samples of a tile and their row vectors,
// rows of R values as in mix_tile.
template <typename T, int kBytes>
DAGFM_HD void gram_tile(const T* DAGFM_RESTRICT g, const T* DAGFM_RESTRICT x, int F, int R, int64_t S,
                        typename Vec<T, kBytes>::type* DAGFM_RESTRICT acc_mem) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes;
  constexpr int kJ = MixBlocking<kBytes>::kGramRows, kK = MixBlocking<kBytes>::kGramCols;
  const int nv = R / kW;
  const int64_t FR = int64_t(F) * R;
  for (int j0 = 0; j0 < F; j0 += kJ) {
    int jr[kJ];
    DAGFM_UNROLL
    for (int a = 0; a < kJ; ++a) jr[a] = std::min(j0 + a, F - 1);
    for (int k0 = 0; k0 < F; k0 += kK) {
      int kr[kK];
      DAGFM_UNROLL
      for (int b = 0; b < kK; ++b) kr[b] = std::min(k0 + b, F - 1);
      V acc[kJ][kK];
      DAGFM_UNROLL
      for (int a = 0; a < kJ; ++a)
        DAGFM_UNROLL
        for (int b = 0; b < kK; ++b) acc[a][b] = acc_mem[int64_t(jr[a]) * F + kr[b]];
      for (int64_t s = 0; s < S; ++s)
        for (int v = 0; v < nv; ++v) {
          const T* gs = g + s * FR + v * kW;
          const T* xs = x + s * FR + v * kW;
          V gv[kJ];
          DAGFM_UNROLL
          for (int a = 0; a < kJ; ++a) gv[a] = vload<V>(gs + int64_t(jr[a]) * R);
          DAGFM_UNROLL
          for (int b = 0; b < kK; ++b) {
            const V xv = vload<V>(xs + int64_t(kr[b]) * R);
            DAGFM_UNROLL
            for (int a = 0; a < kJ; ++a) acc[a][b] += gv[a] * xv;
          }
        }
      // Clamped rows and columns repeat a real one: only the real ones are written back.
      DAGFM_UNROLL
      for (int a = 0; a < kJ; ++a)
        DAGFM_UNROLL
        for (int b = 0; b < kK; ++b)
          if (j0 + a < F && k0 + b < F) acc_mem[int64_t(j0 + a) * F + k0 + b] = acc[a][b];
    }
  }
}

// out[i] = the sum of the lanes of acc[i], i < n.
template <typename T, int kBytes>
DAGFM_HD void gram_lane_sums(const typename Vec<T, kBytes>::type* acc, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = lane_sum<T, kBytes>(acc[i]);
}

#pragma GCC diagnostic pop

#endif  // DAGFM_CPU_VECTORS

}  // namespace cpu
}  // namespace dagfm
