// The CPU vector helpers, written with GCC/Clang vector extensions: a vector of kBytes (64 on
// AVX-512, 32 on AVX2; the caller's target attribute decides which instructions it becomes), loads
// and stores, lane sums, transposed sums and in-register transposes, rows <-> lanes. The register
// blocks built on them are in forward_blocks.h and backward_blocks.h.
//
// Layouts as in dagfm_math.h: a tile's (S, F, D) arrays row-major, sample s at s*F*D; one layer's
// weights p[i][j][d] (inner/outer, q likewise) or p[i][j][d][e] (kernel); only edges i <= j are read.
#pragma once

#include <cstdint>

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

// Non-temporal store of a whole vector to a kBytes-aligned address: for outputs read back only
// after the call, so their lines neither take a read from memory first nor evict the tile's.
// (Inline assembly: the intrinsics would need this helper itself compiled for AVX.)
template <typename T, int kBytes, typename V>
DAGFM_HD void vstream(T* p, const V& v) {
#if defined(__x86_64__)
  if constexpr (kBytes == 64) {
    asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "v"(v));
    return;
  } else if constexpr (kBytes == 32) {
    asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "x"(v));
    return;
  }
#endif
  vstore(p, v);
}

// Whether vstream may store rows at `rows` (nullptr: none), each row_stride values after the last.
template <int kBytes, typename T>
DAGFM_HD bool streamable(const T* rows, int64_t row_stride = 0) {
  return reinterpret_cast<uintptr_t>(rows) % kBytes == 0 && (row_stride * int64_t(sizeof(T))) % kBytes == 0;
}

// Orders this thread's non-temporal stores before whatever it does next (e.g. joining the others).
DAGFM_HD void stream_fence() {
#if defined(__x86_64__)
  asm volatile("sfence" ::: "memory");
#endif
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

// Rows <-> lanes. kToLanes: column k of n <= kW rows (row_stride apart) becomes the vector at
// lanes + k * kW (lane = row; lanes >= n zero); else back (only rows < n written; kStream: whole
// vectors streamed, rows and row_stride aligned to kBytes). K columns; whole kW x kW blocks are
// transposed in registers.
template <typename T, int kBytes, bool kToLanes, bool kStream = false, typename RowPtr, typename LanePtr>
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
      else if (l < n) {
        if constexpr (kStream)
          vstream<T, kBytes>(rows + l * row_stride + k0, v[l]);
        else
          vstore(rows + l * row_stride + k0, v[l]);
      }
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

// stream: non-temporal stores where rows and row_stride allow them (see vstream).
template <typename T, int kBytes>
DAGFM_HD void lanes_to_rows(const T* lanes, int64_t K, int n, T* rows, int64_t row_stride, bool stream = false) {
  if (stream && streamable<kBytes>(rows, row_stride))
    transpose_rows<T, kBytes, false, true>(rows, row_stride, n, K, lanes);
  else
    transpose_rows<T, kBytes, false>(rows, row_stride, n, K, lanes);
}

// out[r] = the sum of the lanes of rows[r], r < kN, in the same bits as row_sums: the same tree
// over the lanes (lanes k and k + kW/2 first, then halving). Rows are folded kW at a time; a group
// of at most kW/2 rows is first halved (that tree's first step), then folded at half width, rather
// than padded with zero rows.
template <typename T, int kBytes, int kN, typename V>
DAGFM_HD void lane_totals(const V* rows, T* out) {
  constexpr int kW = Vec<T, kBytes>::lanes;
  if constexpr (kN <= kW / 2 && kW >= 4) {
    using Half = typename Vec<T, kBytes / 2>::type;
    Half halves[kN];
    DAGFM_UNROLL
    for (int r = 0; r < kN; ++r) {
      Half lo, hi;
      __builtin_memcpy(&lo, &rows[r], kBytes / 2);
      __builtin_memcpy(&hi, reinterpret_cast<const char*>(&rows[r]) + kBytes / 2, kBytes / 2);
      halves[r] = lo + hi;
    }
    lane_totals<T, kBytes / 2, kN>(halves, out);
  } else {
    DAGFM_UNROLL
    for (int r0 = 0; r0 < kN; r0 += kW) {
      V v[kW];
      DAGFM_UNROLL
      for (int k = 0; k < kW; ++k) v[k] = r0 + k < kN ? rows[r0 + k] : V{};
      const V total = transposed_sum<T, kBytes>(v);
      DAGFM_UNROLL
      for (int k = 0; k < kW; ++k)
        if (r0 + k < kN) out[r0 + k] = total[k];
    }
  }
}

// lane_totals of kN rows: whole groups of kW, then the rest as its own (possibly halved) group.
template <typename T, int kBytes, int kN, typename V>
DAGFM_HD void lane_totals(const V (&rows)[kN], T (&out)[kN]) {
  constexpr int kW = Vec<T, kBytes>::lanes, kWhole = kN / kW * kW;
  if constexpr (kWhole > 0) lane_totals<T, kBytes, kWhole>(&rows[0], &out[0]);
  if constexpr (kN > kWhole) lane_totals<T, kBytes, kN - kWhole>(&rows[kWhole], &out[kWhole]);
}

}  // namespace cpu
}  // namespace dagfm

#pragma GCC diagnostic pop
#endif
