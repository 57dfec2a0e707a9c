// The elementwise passes of a CPU backward tile over its rows (samples of F*kD values): per layer
// alpha, grad_h0 and the rebuilt h^{t-1} in one pass; the tile's rows and work buffers.
#pragma once

#include <cstdint>

#include "../dagfm_params.h"
#include "vec.h"

#ifdef DAGFM_CPU_VECTORS
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dagfm {
namespace cpu {

// What one layer's elementwise pass reads and writes for a tile (rows of FD = F*kD values per
// sample): delta (unless the layer is the first of the backward, t = L, where delta^L is the
// broadcast G[L] (row grad_last, samples states_row apart) plus grad_sum), h0, the messages a^t
// and a^{t-1} (samples a_stride apart), grad_h0 and h_buf (h^{t-1} = h0 * a^{t-1}).
template <typename T>
struct LayerRows {
  const T* h0;
  const T* delta;
  const T* a;
  const T* a_prev;
  int64_t a_stride;
  const T* grad_last;
  int64_t states_row;
  const T* grad_sum;
  T* grad_h0;
  T* h_buf;
  int64_t FD;
  int S;
};

// For the fields [j0, j0 + nj) of every sample: alpha_j = delta_j * h0_j (to alpha + s * alpha_row
// + (j - j0) * kD), grad_h0_j = delta_j * a^t_j (kLast: t = L) or += it, and, kRebuild (t > 1),
// h_buf_j = h0_j * a^{t-1}_j. One pass over the rows: h0 and the messages are read once.
template <typename T, int kVB, int kD, bool kLast, bool kRebuild>
DAGFM_HD void layer_rows(const LayerRows<T>& r, int j0, int nj, T* alpha, int64_t alpha_row) {
  using V = typename Vec<T, kVB>::type;
  constexpr int kW = Vec<T, kVB>::lanes, kV = kD / kW;
  for (int s = 0; s < r.S; ++s) {
    const int64_t row = s * r.FD + int64_t(j0) * kD, a_row = s * r.a_stride + int64_t(j0) * kD;
    const T* g = r.grad_last + s * r.states_row + j0;
    T* al = alpha + s * alpha_row;
    for (int jj = 0; jj < nj; ++jj)
      DAGFM_UNROLL
      for (int v = 0; v < kV; ++v) {
        const int64_t col = int64_t(jj) * kD + v * kW, o = row + col;
        V d;
        if constexpr (kLast) {
          d = V{} + g[jj];  // 0 + x: GCC builds x - 0 one lane at a time
          if (r.grad_sum != nullptr) d += vload<V>(r.grad_sum + o);
        } else {
          d = vload<V>(r.delta + o);
        }
        const V x = vload<V>(r.h0 + o), am = vload<V>(r.a + a_row + col);
        vstore(al + col, d * x);
        vstore(r.grad_h0 + o, kLast ? d * am : vload<V>(r.grad_h0 + o) + d * am);
        if constexpr (kRebuild) vstore(r.h_buf + o, x * vload<V>(r.a_prev + a_row + col));
      }
  }
}

// layer_rows for layer t of L.
template <typename T, int kVB, int kD>
DAGFM_HD void layer_rows_at(int t, int L, const LayerRows<T>& r, int j0, int nj, T* alpha, int64_t alpha_row) {
  if (t == L) {
    if (t > 1) layer_rows<T, kVB, kD, true, true>(r, j0, nj, alpha, alpha_row);
    else layer_rows<T, kVB, kD, true, false>(r, j0, nj, alpha, alpha_row);
  } else {
    if (t > 1) layer_rows<T, kVB, kD, false, true>(r, j0, nj, alpha, alpha_row);
    else layer_rows<T, kVB, kD, false, false>(r, j0, nj, alpha, alpha_row);
  }
}

// A backward tile's rows of the inputs and of grad_h0 (samples [b, b + S), rows of F*kD) and its
// work buffers, (S, F, kD) each: delta at ws itself, then delta_prev and alpha.
template <typename T>
struct TileRows {
  const T* h0;
  const T* grad_states;
  const T* grad_sum;
  T* grad_h0;
  T* delta_prev;
  T* alpha;
  int64_t numel;
};

template <typename T>
DAGFM_HD TileRows<T> tile_rows(const PropagateBackwardParams<T>& pr, int64_t b, int S, int kD, T* ws) {
  const int64_t FD = int64_t(pr.num_fields) * kD, SFD = S * FD;
  return TileRows<T>{pr.h0 + b * FD, pr.grad_states + b * int64_t(pr.depth + 1) * pr.num_fields,
                     pr.grad_sum == nullptr ? nullptr : pr.grad_sum + b * FD, pr.grad_h0 + b * FD, ws + SFD,
                     ws + 2 * SFD, SFD};
}

// grad_h0 += delta^0 (the gradient reaching h^0 itself), after the last layer.
template <typename T>
DAGFM_HD void finish_grad_h0(const TileRows<T>& tile, const T* delta) {
  for (int64_t k = 0; k < tile.numel; ++k) tile.grad_h0[k] += delta[k];
}

}  // namespace cpu
}  // namespace dagfm

#pragma GCC diagnostic pop
#endif
