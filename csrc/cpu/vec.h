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

#include <cstdint>

namespace dagfm {
namespace cpu {

// Where one layer's forward writes for a tile: h (rows of F*D per sample) and, when given, the
// messages a (rows a_row elements apart) and the running sum z of the h^t (rows of F*D):
// z = h0 + h on the first layer, z += h on the others.
template <typename T>
struct LayerOut {
  T* h = nullptr;
  T* a = nullptr;
  int64_t a_row = 0;
  T* z = nullptr;
  bool z_first = false;
};

}  // namespace cpu
}  // namespace dagfm

#if defined(__GNUC__) || defined(__clang__)
#define DAGFM_CPU_VECTORS 1

#include <type_traits>
#include <utility>

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

// Lane indices for __builtin_shuffle over two vectors a, b of kW lanes (an index >= kW picks from
// b): lane k of the result, in the low w lanes of its block of 2w, is lane k + kLoShift of a (of b
// with kLoFromB = 1); in the high w lanes, lane k + kHiShift of a or b likewise.
template <typename T, int kBytes>
struct LaneIndex {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I type __attribute__((vector_size(kBytes)));
};
template <typename T, int kBytes>
using LaneIndexVec = typename LaneIndex<T, kBytes>::type;

template <typename M, int kW, int w, int kLoFromB, int kLoShift, int kHiFromB, int kHiShift, int... k>
constexpr M lane_index(std::integer_sequence<int, k...>) {
  return M{((k % (2 * w)) < w ? kLoFromB * kW + k + kLoShift : kHiFromB * kW + k + kHiShift)...};
}

// Within every block of 2w lanes: the low w lanes hold a's block folded in half (lo + hi), the high
// w lanes b's. kW rows folded at w = kW/2, kW/4, ..., 1 (rows i and i + w paired) leave row r's
// total in lane r: a transposed sum, a select, a shuffle and an add per row.
template <typename T, int kBytes, int w, typename V>
DAGFM_HD V fold_pair(const V& a, const V& b) {
  using M = LaneIndexVec<T, kBytes>;
  constexpr int kW = Vec<T, kBytes>::lanes;
  constexpr auto seq = std::make_integer_sequence<int, kW>{};
  constexpr M low_half = lane_index<M, kW, w, 0, 0, 0, 0>(seq) % (2 * w) < w;  // all ones where a's lanes
  constexpr M swapped = lane_index<M, kW, w, 0, w, 1, -w>(seq);               // [a.hi, b.lo]
  return (low_half ? a : b) + __builtin_shuffle(a, b, swapped);
}

// Folds kW vectors as above: v[0] lane r = the sum of v[r]'s lanes.
template <typename T, int kBytes, typename V>
DAGFM_HD V transposed_sum(V (&v)[Vec<T, kBytes>::lanes]) {
  constexpr int kW = Vec<T, kBytes>::lanes;
  auto fold = [&]<int w>() __attribute__((always_inline)) {
    DAGFM_UNROLL
    for (int k = 0; k < w; ++k) v[k] = fold_pair<T, kBytes, w>(v[k], v[k + w]);
  };
  if constexpr (kW >= 16) fold.template operator()<8>();
  if constexpr (kW >= 8) fold.template operator()<4>();
  if constexpr (kW >= 4) fold.template operator()<2>();
  fold.template operator()<1>();
  return v[0];
}

// out[r] = sum of the kD values of row r, rows of kD values (whole vectors) from `rows`, r < n.
template <typename T, int kBytes, int kD>
DAGFM_HD void row_sums(const T* DAGFM_RESTRICT rows, int64_t n, T* DAGFM_RESTRICT out) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  // Row r's vectors added into v[k] (V{} past the last row).
  auto load_rows = [&](V (&v)[kW], int64_t r0, int64_t m) __attribute__((always_inline)) {
    DAGFM_UNROLL
    for (int k = 0; k < kW; ++k) {
      v[k] = V{};
      if (k < m)
        DAGFM_UNROLL
        for (int c = 0; c < kV; ++c) v[k] += vload<V>(rows + (r0 + k) * kD + c * kW);
    }
  };
  int64_t r0 = 0;
  for (; r0 + kW <= n; r0 += kW) {
    V v[kW];
    load_rows(v, r0, kW);
    vstore(out + r0, transposed_sum<T, kBytes>(v));
  }
  if (r0 < n) {
    V v[kW];
    load_rows(v, r0, n - r0);
    const V total = transposed_sum<T, kBytes>(v);
    for (int k = 0; r0 + k < n; ++k) out[r0 + k] = total[k];
  }
}

// In-place transpose of a kW x kW block held as kW vectors: stage w swaps the off-diagonal w x w
// blocks of every 2w x 2w block (rows i, i + w).
template <typename T, int kBytes, typename V>
DAGFM_HD void transpose_block(V (&v)[Vec<T, kBytes>::lanes]) {
  using M = LaneIndexVec<T, kBytes>;
  constexpr int kW = Vec<T, kBytes>::lanes;
  constexpr auto seq = std::make_integer_sequence<int, kW>{};
  auto stage = [&]<int w>() __attribute__((always_inline)) {
    constexpr M low = lane_index<M, kW, w, 0, 0, 1, -w>(seq);   // [a.lo, b.lo]
    constexpr M high = lane_index<M, kW, w, 0, w, 1, 0>(seq);   // [a.hi, b.hi]
    DAGFM_UNROLL
    for (int i = 0; i < kW; ++i)
      if ((i % (2 * w)) < w) {
        const V a = v[i], b = v[i + w];
        v[i] = __builtin_shuffle(a, b, low);
        v[i + w] = __builtin_shuffle(a, b, high);
      }
  };
  if constexpr (kW >= 16) stage.template operator()<8>();
  if constexpr (kW >= 8) stage.template operator()<4>();
  if constexpr (kW >= 4) stage.template operator()<2>();
  if constexpr (kW >= 2) stage.template operator()<1>();
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

// Writes h_j = h0_j * a_j (and a_j, z_j as `out` asks) for the kM samples at s0 and fields
// [j0, j0 + kJ).
template <typename T, int kBytes, int kD, int kM, int kJ, typename V>
DAGFM_HD void store_messages(V (&acc)[kM][kJ][kD / Vec<T, kBytes>::lanes], const T* DAGFM_RESTRICT h0,
                             const LayerOut<T>& out, int64_t FD, int j0, int s0) {
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  T* DAGFM_RESTRICT h_next = out.h;
  T* DAGFM_RESTRICT a = out.a;
  T* DAGFM_RESTRICT z = out.z;
  const int64_t a_row = out.a_row;
  const bool z_first = out.z_first;
  DAGFM_UNROLL
  for (int m = 0; m < kM; ++m)
    DAGFM_UNROLL
    for (int jj = 0; jj < kJ; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        const int64_t col = int64_t(j0 + jj) * kD + v * kW, o = (s0 + m) * FD + col;
        const V x = vload<V>(h0 + o), h = x * acc[m][jj][v];
        vstore(h_next + o, h);
        if (a != nullptr) vstore(a + (s0 + m) * a_row + col, acc[m][jj][v]);
        if (z != nullptr) vstore(z + o, (z_first ? x : vload<V>(z + o)) + h);
      }
}

// The weight vectors of edges (i, j0 + jj), jj < kJ, of one layer's (F, F, kD) weights w: zero
// for jj < first (edges i > j, never read).
template <typename T, int kBytes, int kD, int kJ, typename V>
DAGFM_HD void load_edge_columns(const T* DAGFM_RESTRICT w, int F, int i, int j0, int first,
                                V (&out)[kJ][kD / Vec<T, kBytes>::lanes]) {
  constexpr int kW = Vec<T, kBytes>::lanes, kV = kD / kW;
  const T* row = w + (int64_t(i) * F + j0) * kD;
  // The rows two sources ahead (a row is F*kD values apart): the hardware prefetcher does not
  // follow that stride early enough. Prefetching never faults, past the end included.
  DAGFM_UNROLL
  for (int c = 0; c < kJ * kD * int(sizeof(T)); c += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row + 2 * int64_t(F) * kD) + c);
  DAGFM_UNROLL
  for (int jj = 0; jj < kJ; ++jj)
    DAGFM_UNROLL
    for (int v = 0; v < kV; ++v) out[jj][v] = jj >= first ? vload<V>(row + jj * kD + v * kW) : V{};
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
  auto step = [&](int i, int first) __attribute__((always_inline)) {
    const T* hi = h_prev + s0 * FD + int64_t(i) * kD;
    V wv[kJ][kV];
    load_edge_columns<T, kBytes, kD, kJ>(p, F, i, j0, first, wv);
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
  auto step = [&](int i, int first) __attribute__((always_inline)) {
    V qv[kJ][kV];
    load_edge_columns<T, kBytes, kD, kJ>(q, F, i, j0, first, qv);
    DAGFM_UNROLL
    for (int m = 0; m < kM; ++m)
      DAGFM_UNROLL
      for (int jj = 0; jj < kJ; ++jj)
        if (jj >= first) {
          const T cij = c[(m * int64_t(F) + i) * row + j0 + jj];
          DAGFM_UNROLL
          for (int v = 0; v < kV; ++v) acc[m][jj][v] += cij * qv[jj][v];
        }
  };
  // As in inner_forward_block: sources i <= j0 reach every field of the block, the next ones only
  // the fields >= i.
  for (int i = 0; i <= j0; ++i) step(i, 0);
  for (int i = j0 + 1; i < j0 + kJ; ++i) step(i, i - j0);
  store_messages<T, kBytes, kD, kM, kJ>(acc, h0, out, FD, j0, s0);
}

// Rows <-> lanes. kToLanes: column k of n <= kW rows (row_stride apart) becomes the vector at
// lanes + k * kW (lane = row; lanes >= n zero); else back (only rows < n written). K columns;
// whole kW x kW blocks are transposed in registers.
template <typename T, int kBytes, bool kToLanes, typename RowPtr, typename LanePtr>
DAGFM_HD void transpose_rows(RowPtr DAGFM_RESTRICT rows, int64_t row_stride, int n, int64_t K,
                             LanePtr DAGFM_RESTRICT lanes) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes;
  int64_t k0 = 0;
  for (; k0 + kW <= K; k0 += kW) {
    V v[kW];
    DAGFM_UNROLL
    for (int l = 0; l < kW; ++l) {
      if constexpr (kToLanes)
        v[l] = l < n ? vload<V>(rows + l * row_stride + k0) : V{};
      else
        v[l] = vload<V>(lanes + (k0 + l) * kW);
    }
    transpose_block<T, kBytes>(v);
    DAGFM_UNROLL
    for (int l = 0; l < kW; ++l) {
      if constexpr (kToLanes)
        vstore(lanes + (k0 + l) * kW, v[l]);
      else if (l < n)
        vstore(rows + l * row_stride + k0, v[l]);
    }
  }
  for (; k0 < K; ++k0)
    for (int l = 0; l < kW; ++l) {
      if constexpr (kToLanes)
        lanes[k0 * kW + l] = l < n ? rows[l * row_stride + k0] : T(0);
      else if (l < n)
        rows[l * row_stride + k0] = lanes[k0 * kW + l];
    }
}

template <typename T, int kBytes>
DAGFM_HD void rows_to_lanes(const T* rows, int64_t row_stride, int n, int64_t K, T* lanes) {
  transpose_rows<T, kBytes, true>(rows, row_stride, n, K, lanes);
}

template <typename T, int kBytes>
DAGFM_HD void lanes_to_rows(const T* lanes, int64_t K, int n, T* rows, int64_t row_stride) {
  transpose_rows<T, kBytes, false>(rows, row_stride, n, K, lanes);
}

// Outer interaction for up to one vector of samples (n, sample s in lane s) through all L layers:
// per layer first every edge's dot product c_ij = <p_ij, h_i> (h_i in registers, kDot vectors at
// a time, p_ij[d] broadcast), then a_j = sum_{i<=j} c_ij q_ij (kAcc of its vectors at a time,
// q_ij[e] broadcast): no horizontal sums.
// h0: the group's rows (F*kD apart); states, saved (rows L*F*kD apart, layer 0's messages) and z
// (rows F*kD apart) likewise from the group's first sample; saved and z may be nullptr.
// ws: h0, two h buffers, a, z (each (F, kD) vectors) and the (F, F) edge dots.
template <typename T, int kBytes, int kD, int kDot, int kAcc>
DAGFM_HD void outer_forward_lanes(const T* DAGFM_RESTRICT p, const T* DAGFM_RESTRICT q, const T* h0, int n,
                                  int F, int L, T* ws, T* states, int64_t states_row, T* saved, T* z) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kW = Vec<T, kBytes>::lanes;
  const int64_t FD = int64_t(F) * kD, VFD = FD * kW;
  T* h0T = ws;
  T* hbuf[2] = {ws + VFD, ws + 2 * VFD};
  T* aT = ws + 3 * VFD;  // messages, then the per-field state sums
  T* zT = ws + 4 * VFD;
  T* C = ws + 5 * VFD;
  rows_to_lanes<T, kBytes>(h0, FD, n, FD, h0T);
  // s_j = sum_e h_j[e] for every field into aT's first F vectors, then out to the states of layer t.
  auto write_states = [&](const T* hT, int t) __attribute__((always_inline)) {
    for (int j = 0; j < F; ++j) {
      V sv[2] = {V{}, V{}};
      DAGFM_UNROLL
      for (int e = 0; e < kD; ++e) sv[e & 1] += vload<V>(hT + (int64_t(j) * kD + e) * kW);
      vstore(aT + int64_t(j) * kW, sv[0] + sv[1]);
    }
    lanes_to_rows<T, kBytes>(aT, F, n, states + int64_t(t) * F, states_row);
  };
  write_states(h0T, 0);
  if (z != nullptr && L == 0) lanes_to_rows<T, kBytes>(h0T, FD, n, z, FD);
  const T* h_prev = h0T;
  const int64_t layer = FD * F;
  for (int t = 1; t <= L; ++t) {
    T* h = hbuf[t & 1];
    const T* pt = p + (t - 1) * layer;
    const T* qt = q + (t - 1) * layer;
    // c_ij for edges (i, j..j+4), kDot of h_i's vectors at a time in registers, two partial sums
    // per edge; with kDot < kD the later chunks add to the partial dots in C.
    auto dots = [&]<int kE>(int i, int j, int d0, const V (&hv)[kDot]) __attribute__((always_inline)) {
      const T* w = pt + (int64_t(i) * F + j) * kD + d0;
      V c[kE][2];
      DAGFM_UNROLL
      for (int e = 0; e < kE; ++e) {
        c[e][0] = d0 == 0 ? V{} : vload<V>(C + (int64_t(i) * F + j + e) * kW);
        c[e][1] = V{};
      }
      DAGFM_UNROLL
      for (int d = 0; d < kDot; ++d)
        DAGFM_UNROLL
        for (int e = 0; e < kE; ++e) c[e][d & 1] += w[e * kD + d] * hv[d];
      DAGFM_UNROLL
      for (int e = 0; e < kE; ++e) vstore(C + (int64_t(i) * F + j + e) * kW, c[e][0] + c[e][1]);
    };
    for (int d0 = 0; d0 < kD; d0 += kDot)
      for (int i = 0; i < F; ++i) {
        V hv[kDot];
        DAGFM_UNROLL
        for (int d = 0; d < kDot; ++d) hv[d] = vload<V>(h_prev + (int64_t(i) * kD + d0 + d) * kW);
        int j = i;
        for (; j + 4 <= F; j += 4) dots.template operator()<4>(i, j, d0, hv);
        for (; j < F; ++j) dots.template operator()<1>(i, j, d0, hv);
      }
    // a_j, kAcc of its kD vectors at a time in registers.
    for (int j = 0; j < F; ++j)
      for (int e0 = 0; e0 < kD; e0 += kAcc) {
        V acc[kAcc];
        DAGFM_UNROLL
        for (int e = 0; e < kAcc; ++e) acc[e] = V{};
        for (int i = 0; i <= j; ++i) {
          const V c = vload<V>(C + (int64_t(i) * F + j) * kW);
          const T* qq = qt + (int64_t(i) * F + j) * kD + e0;
          DAGFM_UNROLL
          for (int e = 0; e < kAcc; ++e) acc[e] += qq[e] * c;
        }
        DAGFM_UNROLL
        for (int e = 0; e < kAcc; ++e) {
          const int64_t o = (int64_t(j) * kD + e0 + e) * kW;
          const V x = vload<V>(h0T + o), hv = x * acc[e];
          vstore(h + o, hv);
          if (saved != nullptr) vstore(aT + o, acc[e]);
          if (z != nullptr) vstore(zT + o, (t == 1 ? x : vload<V>(zT + o)) + hv);
        }
      }
    if (saved != nullptr) lanes_to_rows<T, kBytes>(aT, FD, n, saved + (t - 1) * FD, L * FD);
    write_states(h, t);
    h_prev = h;
  }
  if (z != nullptr && L > 0) lanes_to_rows<T, kBytes>(zT, FD, n, z, FD);
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
  store_messages<T, kBytes, kD, kM, kJ>(acc, h0, out, FD, j0, s0);
}

}  // namespace cpu
}  // namespace dagfm

#pragma GCC diagnostic pop
#endif
