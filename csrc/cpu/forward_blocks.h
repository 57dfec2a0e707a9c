// Register-blocked CPU loops of the forward (vector extensions as in vec.h): one layer's messages
// a_j for a block of samples and target fields, per interaction, and what a block writes from its
// accumulators. Each block keeps its accumulators in registers and loads every weight vector once
// for several samples (and fields): the weights of a layer are the large operand, the tile's
// states the small one. The outer interaction with samples in vector lanes is forward_lanes.h.
#pragma once

#include <cstdint>
#include <utility>

#include "../dagfm_math.h"

namespace dagfm {
namespace cpu {

// Where one layer's forward writes for a tile: h (rows of F*D per sample) and, when given, the
// messages a (rows a_row elements apart), the running sum z of the h^t (rows of F*D):
// z = h0 + h on the first layer, z += h on the others, and the layer's states (F per sample, rows
// states_row apart; only the register blocks write them, from their accumulators, where
// states_in_blocks). states0: layer 0's states, which the first layer's register blocks sum from
// the h0 they load (same rows), on every vector width.
template <typename T>
struct LayerOut {
  T* h = nullptr;
  T* a = nullptr;
  int64_t a_row = 0;
  T* z = nullptr;
  bool z_first = false;
  // Streamed (vstream, aligned): a, and the last layer's sums into z_out instead of z (nullptr: z
  // is where they go, stored as every layer's).
  bool a_stream = false;
  T* z_out = nullptr;
  T* states = nullptr;
  int64_t states_row = 0;
  T* states0 = nullptr;
};

// Whether the register blocks sum the states themselves (store_messages) on kBytes vectors: on
// AVX-512; on AVX2 summing the stored rows measured faster.
template <int kBytes>
constexpr bool states_in_blocks() { return kBytes == 64; }

}  // namespace cpu
}  // namespace dagfm

#include "vec.h"

#ifdef DAGFM_CPU_VECTORS
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dagfm {
namespace cpu {

template <int kM, int kJ, int kV, typename V>
DAGFM_HD void zero_all(V (&acc)[kM][kJ][kV]) {
  DAGFM_UNROLL
  for (int m = 0; m < kM; ++m)
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) acc[m][jj][v] = V{};
}

// The sums of the kM x kJ rows of a block, row(m, jj, v) giving vector v of row (m, jj), into
// states[m * states_row + jj]: the same additions, and so the same bits, as row_sums over the
// stored rows (from zero, which gives +0 for a row of -0, then the same tree over the lanes).
template <typename T, int kBytes, int kD, int kM, int kJ, typename Row>
DAGFM_HD void block_states(Row&& row, T* DAGFM_RESTRICT states, int64_t states_row) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kV = kD / Vec<T, kBytes>::lanes;
  V totals[kM * kJ];
  DAGFM_UNROLL
  for (int m = 0; m < kM; ++m)
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj) {
      totals[m * kJ + jj] = V{};
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) totals[m * kJ + jj] += row(m, jj, v);
    }
  T sums[kM * kJ];
  lane_totals<T, kBytes>(totals, sums);
  DAGFM_UNROLL
  for (int m = 0; m < kM; ++m)
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj) states[m * states_row + jj] = sums[m * kJ + jj];
}

// Writes h_j = h0_j * a_j (and a_j, z_j, the states s_j as `out` asks) for the kM samples at s0 and
// fields [j0, j0 + kJ). Each output is one branch-free pass over the block (not one test per vector
// and output: those branches and their address arithmetic cost the inner forward ~6%); h replaces
// a in acc once a is stored. The states are summed here while h is in registers (not re-read from
// the tile), in the same bits as row_sums over the stored rows: h is stored, so it is rounded
// before the sum (never contracted into an FMA with it).
template <typename T, int kBytes, int kD, int kM, int kJ, typename V>
DAGFM_HD void store_messages(V (&acc)[kM][kJ][kD / Vec<T, kBytes>::lanes], const T* DAGFM_RESTRICT h0,
                             const LayerOut<T>& out, int64_t FD, int j0, int s0) {
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  // f(m, jj, v, offset of the vector in its sample's row) for every vector of the block.
  auto each = [&](auto&& f) __attribute__((always_inline)) {
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m)
      DAGFM_UNROLL
      for (int jj = 0; jj < kJ; ++jj)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) f(m, jj, v, int64_t(j0 + jj) * kD + v * kW);
  };
  if (out.a != nullptr) {
    T* DAGFM_RESTRICT a = out.a + s0 * out.a_row;
    const int64_t a_row = out.a_row;
    if (out.a_stream)
      each([&](int m, int jj, int v, int64_t col) __attribute__((always_inline)) {
        vstream<T, kBytes>(a + m * a_row + col, acc[m][jj][v]);
      });
    else
      each([&](int m, int jj, int v, int64_t col) __attribute__((always_inline)) {
        vstore(a + m * a_row + col, acc[m][jj][v]);
      });
  }
  const T* DAGFM_RESTRICT x = h0 + s0 * FD;
  T* DAGFM_RESTRICT h = out.h + s0 * FD;
  each([&](int m, int jj, int v, int64_t col) __attribute__((always_inline)) {
    acc[m][jj][v] = vload<V>(x + m * FD + col) * acc[m][jj][v];
    vstore(h + m * FD + col, acc[m][jj][v]);
  });
  if (out.z != nullptr) {
    // z = h0 + h on the first layer, z + h after; the last layer's streamed into z_out.
    const T* z_in = out.z_first ? x : out.z + s0 * FD;
    T* DAGFM_RESTRICT z = (out.z_out != nullptr ? out.z_out : out.z) + s0 * FD;
    if (out.z_out != nullptr)
      each([&](int m, int jj, int v, int64_t col) __attribute__((always_inline)) {
        vstream<T, kBytes>(z + m * FD + col, vload<V>(z_in + m * FD + col) + acc[m][jj][v]);
      });
    else
      each([&](int m, int jj, int v, int64_t col) __attribute__((always_inline)) {
        vstore(z + m * FD + col, vload<V>(z_in + m * FD + col) + acc[m][jj][v]);
      });
  }
  {
    const int64_t first = s0 * out.states_row + j0;
    // Layer 0's from h0, loaded here anyway: a pass of its own waited on h0's first reads from
    // memory with nothing to overlap them (a tenth of the inner forward's time).
    if (out.states0 != nullptr)
      block_states<T, kBytes, kD, kM, kJ>(
          [&](int m, int jj, int v) __attribute__((always_inline)) {
            return vload<V>(x + m * FD + int64_t(j0 + jj) * kD + v * kW);
          },
          out.states0 + first, out.states_row);
    if (states_in_blocks<kBytes>() && out.states != nullptr)
      block_states<T, kBytes, kD, kM, kJ>(
          [&](int m, int jj, int v) __attribute__((always_inline)) { return acc[m][jj][v]; },
          out.states + first, out.states_row);
  }
}

// Runs step.template operator()<f>(j0 + f) for f = 1 .. kJ-1: the sources inside a block of kJ
// target fields from j0, source j0 + f reaching only the fields j0 + f and after. With the mask a
// constant, each such step is straight-line code with exactly its FMAs (a mask tested per FMA
// branched through the whole step and cost the inner forward ~3%).
template <int kJ, typename Step>
DAGFM_HD void diagonal_sources(int j0, Step&& step) {
  [&]<int... kF>(std::integer_sequence<int, kF...>) __attribute__((always_inline)) {
    (step.template operator()<kF + 1>(j0 + kF + 1), ...);
  }(std::make_integer_sequence<int, kJ - 1>{});
}

// The weight vectors of edges (i, j0 + jj), jj < kJ, of one layer's (F, F, kD) weights w: zero
// for jj < kFirst (edges i > j, never read).
template <typename T, int kBytes, int kD, int kJ, int kFirst, typename V>
DAGFM_HD void load_edge_columns(const T* DAGFM_RESTRICT w, int F, int i, int j0,
                                V (&out)[kJ][kD / Vec<T, kBytes>::lanes]) {
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const T* row = w + (int64_t(i) * F + j0) * kD;
  // The rows two sources ahead (a row is F*kD values apart): the hardware prefetcher does not
  // follow that stride early enough. Prefetching never faults, past the end included. Not from the
  // diagonal sources (kFirst > 0): the rows after them are past the block's last source.
  if constexpr (kFirst == 0)
    DAGFM_UNROLL
    for (int c = 0; c < kJ * kD * int(sizeof(T)); c += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(row + 2 * int64_t(F) * kD) + c);
  DAGFM_UNROLL
  for (int jj = 0; jj < kJ; ++jj)
    DAGFM_UNROLL
    for (int v = 0; v < kV; ++v) out[jj][v] = jj >= kFirst ? vload<V>(row + jj * kD + v * kW) : V{};
}

// Inner interaction, a_j = sum_{i<=j} p_ij * h_i for kM samples and kJ fields: per source field i,
// kJ weight vectors and kM state vectors feed kM * kJ FMAs.
template <typename T, int kBytes, int kD, int kM, int kJ>
DAGFM_HD void inner_forward_block(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT h0,
                                  const T* DAGFM_RESTRICT h_prev, const LayerOut<T>& out, int F, int j0,
                                  int s0) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const int64_t FD = int64_t(F) * kD;
  V acc[kM][kJ][kV];
  zero_all(acc);
  auto step = [&]<int kFirst>(int i) __attribute__((always_inline)) {
    const T* hi = h_prev + s0 * FD + int64_t(i) * kD;
    V wv[kJ][kV];
    load_edge_columns<T, kBytes, kD, kJ, kFirst>(p, F, i, j0, wv);
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        const V h = vload<V>(hi + m * FD + v * kW);
        DAGFM_UNROLL
        for (int jj = 0; jj < kJ; ++jj)
          if (jj >= kFirst) acc[m][jj][v] += wv[jj][v] * h;
      }
  };
  // Sources i <= j0 reach every field of the block (the hot loop, no masking); i in
  // (j0, j0 + kJ) only the fields >= i (never multiplied by a missing edge: Inf * 0 is NaN).
  for (int i = 0; i <= j0; ++i) step.template operator()<0>(i);
  diagonal_sources<kJ>(j0, step);
  store_messages<T, kBytes, kD, kM, kJ>(acc, h0, out, FD, j0, s0);
}

// Row pitch of outer_edge_dots' output: a row's last kW-wide store may start at j = F - 1.
template <typename T, int kBytes>
constexpr int64_t outer_dots_row(int F) {
  return int64_t(F) + Vec<T, kBytes>::lanes;
}

// Outer interaction, the edge dots c_ij = <p_ij, h_i> (i <= j) of kM samples from s0, into
// c[m][i][j] (rows outer_dots_row apart). Row i of p is contiguous over j, so kW consecutive targets
// give kW products reduced together by one transposed sum, instead of a horizontal sum per dot.
template <typename T, int kBytes, int kD, int kM>
DAGFM_HD void outer_edge_dots(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT h_prev, int F, int s0,
                              T* DAGFM_RESTRICT c) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const int64_t FD = int64_t(F) * kD, row = outer_dots_row<T, kBytes>(F);
  // The dots of targets [j0, j0 + n) for every sample; past the last field, zero rows never loaded.
  auto group = [&]<bool kFull>(int i, int j0, int n) __attribute__((always_inline)) {
    const T* w = p + int64_t(i) * FD + int64_t(j0) * kD;
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m) {
      V hv[kV], prod[kW];
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) hv[v] = vload<V>(h_prev + (s0 + m) * FD + int64_t(i) * kD + v * kW);
      DAGFM_UNROLL
      for (int k = 0; k < kW; ++k) {
        prod[k] = V{};
        if (kFull || k < n)
          DAGFM_UNROLL
          for (int v = 0; v < kV; ++v) prod[k] += vload<V>(w + k * kD + v * kW) * hv[v];
      }
      vstore(c + (m * int64_t(F) + i) * row + j0, transposed_sum<T, kBytes>(prod));
    }
  };
  for (int i = 0; i < F; ++i) {
    int j0 = i;
    for (; j0 + kW <= F; j0 += kW) group.template operator()<true>(i, j0, kW);
    if (j0 < F) group.template operator()<false>(i, j0, F - j0);
  }
}

// Outer interaction, a_j = sum_{i<=j} c_ij q_ij for kM samples and kJ fields from the dots of
// outer_edge_dots: per source i, kJ vectors of q feed kM * kJ FMAs with broadcast dots.
template <typename T, int kBytes, int kD, int kM, int kJ>
DAGFM_HD void outer_messages_block(const T* DAGFM_RESTRICT q, const T* DAGFM_RESTRICT c,
                                   const T* DAGFM_RESTRICT h0, const LayerOut<T>& out, int F, int j0, int s0) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const int64_t FD = int64_t(F) * kD, row = outer_dots_row<T, kBytes>(F);
  V acc[kM][kJ][kV];
  zero_all(acc);
  auto step = [&]<int kFirst>(int i) __attribute__((always_inline)) {
    V qv[kJ][kV];
    load_edge_columns<T, kBytes, kD, kJ, kFirst>(q, F, i, j0, qv);
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m)
      DAGFM_UNROLL
      for (int jj = 0; jj < kJ; ++jj)
        if (jj >= kFirst) {
          const T cij = c[(m * int64_t(F) + i) * row + j0 + jj];
          DAGFM_UNROLL
          for (int v = 0; v < kV; ++v) acc[m][jj][v] += cij * qv[jj][v];
        }
  };
  // As in inner_forward_block: sources i <= j0 reach every field of the block, the next ones only
  // the fields >= i.
  for (int i = 0; i <= j0; ++i) step.template operator()<0>(i);
  diagonal_sources<kJ>(j0, step);
  store_messages<T, kBytes, kD, kM, kJ>(acc, h0, out, FD, j0, s0);
}

// Kernel interaction, a_j[e] = sum_{i<=j} sum_d h_i[d] p_ij[d][e], for kM samples and kJ fields:
// per (i, d), kJ weight rows (read in p's own layout) and kM broadcast states feed kM * kJ * kV FMAs.
// The blocks (i, j) with i > j are never read nor multiplied.
template <typename T, int kBytes, int kD, int kM, int kJ>
DAGFM_HD void kernel_forward_block(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT h0,
                                   const T* DAGFM_RESTRICT h_prev, const LayerOut<T>& out, int F, int j0,
                                   int s0) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  constexpr int64_t kDD = int64_t(kD) * kD;
  const int64_t FD = int64_t(F) * kD;
  V acc[kM][kJ][kV];
  zero_all(acc);
  auto step = [&]<int kFirst>(int i) __attribute__((always_inline)) {
    const T* w = p + (int64_t(i) * F + j0) * kDD;
    const T* hi = h_prev + s0 * FD + int64_t(i) * kD;
    for (int d = 0; d < kD; ++d) {
      V wv[kJ][kV];
      DAGFM_UNROLL
      for (int jj = 0; jj < kJ; ++jj)
        DAGFM_UNROLL
        for (int v = 0; v < kV; ++v) wv[jj][v] = jj >= kFirst ? vload<V>(w + jj * kDD + d * kD + v * kW) : V{};
      DAGFM_UNROLL
      for (int m = 0; m < kM; ++m) {
        const T h = hi[m * FD + d];
        DAGFM_UNROLL
        for (int jj = 0; jj < kJ; ++jj)
          DAGFM_UNROLL
          for (int v = 0; v < kV; ++v)
            if (jj >= kFirst) acc[m][jj][v] += h * wv[jj][v];
      }
    }
  };
  // Sources i <= j0 reach every field of the block (the hot loop, no masking); i in
  // (j0, j0 + kJ) only the fields >= i.
  for (int i = 0; i <= j0; ++i) step.template operator()<0>(i);
  diagonal_sources<kJ>(j0, step);
  store_messages<T, kBytes, kD, kM, kJ>(acc, h0, out, FD, j0, s0);
}

}  // namespace cpu
}  // namespace dagfm

#pragma GCC diagnostic pop
#endif
