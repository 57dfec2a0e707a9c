// One tile of S consecutive samples back through all L layers on the CPU: the register blocks of
// backward_blocks.h where the embedding size fits whole vectors, the portable loops of
// dagfm_math.h elsewhere. Template arguments as in tile.h.
#pragma once

#include <cstdint>

#include "../dagfm_math.h"
#include "../dagfm_params.h"
#include "backward_blocks.h"
#include "tile.h"

// The vector loops below are always inlined: no vector crosses an ABI boundary.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dagfm {
namespace cpu {

// Runs block<kJb>(j0) over the fields [0, F): the F % kJ leftover fields first, in halving blocks
// (there the triangle has the fewest sources), then blocks of kJ. The blocks must be lambdas marked
// always_inline: an outlined lambda would lose the caller's target instruction set.
template <int kJ, typename Block>
DAGFM_HD void over_fields(int F, Block&& block) {
  static_assert((kJ & (kJ - 1)) == 0, "kJ: a power of two");
  int j0 = 0;
  if constexpr (kJ > 1) {
    over_fields<kJ / 2>(F % kJ, block);
    j0 = F % kJ;
  }
  for (; j0 < F; j0 += kJ) block.template operator()<kJ>(j0);
}

// Scratch of the outer backward in lanes, in elements: h and alpha transposed, the edge dots.
DAGFM_HD int64_t outer_lanes_scratch_numel(int F, int D) { return 2 * (int64_t(F) * D + int64_t(F) * F) * 16; }

// Target fields per inner backward register block (see inner_backward_block): a power of two
// sized to the vector registers (32 on AVX-512, 16 on AVX2); 0 where the portable loops run.
template <typename T, int kBytes, int kRegs, int kD>
constexpr int inner_backward_fields() {
#ifdef DAGFM_CPU_VECTORS
  constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
  if constexpr (kVB > 0) {
    constexpr int kV = kD / Vec<T, kVB>::lanes;
    constexpr int kVecRegs = kRegs >= 24 ? 32 : 16;
    return kVecRegs / 4 / kV > 1 ? kVecRegs / 4 / kV : 1;
  }
#endif
  return 0;
}

// Start of delta^t for the tile: G[t, j] broadcast over the values of field j, plus the sum's
// gradient where there is one; dagfm_math.h's broadcast_grad_states, in whole vectors where rows of
// kD values split into them.
template <typename T, int kBytes, int kD>
DAGFM_HD void broadcast_deltas(const T* grad_states, int t, T* out, int F, int D, int L, int S, const T* grad_sum) {
#ifdef DAGFM_CPU_VECTORS
  constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
  if constexpr (kVB > 0) {
    using V = typename Vec<T, kVB>::type;
    constexpr int kW = Vec<T, kVB>::lanes;
    const int64_t FD = int64_t(F) * kD, states_row = int64_t(L + 1) * F;
    for (int s = 0; s < S; ++s) {
      const T* g = grad_states + s * states_row + int64_t(t) * F;
      const T* z = grad_sum == nullptr ? nullptr : grad_sum + s * FD;
      T* o = out + s * FD;
      for (int j = 0; j < F; ++j) {
        const V gj = V{} + g[j];  // 0 + x: GCC builds x - 0 one lane at a time
        DAGFM_UNROLL
        for (int k = 0; k < kD; k += kW) {
          const int64_t c = int64_t(j) * kD + k;
          vstore(o + c, z == nullptr ? gj : gj + vload<V>(z + c));
        }
      }
    }
    return;
  }
#endif
  broadcast_grad_states(grad_states, t, out, F, D, L, S, grad_sum);
}

#ifdef DAGFM_CPU_VECTORS
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

// What a backward tile first reads from memory after layer t's register blocks, for `prefetch`
// to fetch while they run: a^{t-2} of this tile (read by layer t-1); in layers 2 and 1, the next
// tile's a^L and h0, then its grad_h0, a^{L-1} and the gradients it starts from. message(t): a^t of
// the tile's first sample, samples message_stride apart; next_messages: the next tile's a^1 in the
// kept messages, or nullptr.
template <typename T, typename Message>
DAGFM_HD void plan_next_reads(LinePrefetcher& prefetch, const PropagateBackwardParams<T>& pr, int64_t b, int S,
                              int t, Message&& message, int64_t message_stride, const T* next_messages) {
  const int L = pr.depth;
  const int64_t FD = int64_t(pr.num_fields) * pr.embed_dim, states_row = int64_t(L + 1) * pr.num_fields;
  const int64_t row_bytes = FD * int64_t(sizeof(T)), message_bytes = message_stride * int64_t(sizeof(T));
  const int64_t next = b + S, next_rows = next + S <= pr.batch ? S : pr.batch - next;
  prefetch.clear();
  if (t > 2) prefetch.add(message(t - 2), S, row_bytes, message_bytes, false);
  if (t > 2 || next_rows <= 0) return;
  // Half of the next tile's reads during layer 2, the rest during layer 1.
  const int half = t == 2 ? 0 : L == 1 ? 2 : 1;
  const int64_t block_bytes = next_rows * row_bytes;
  if (half != 1) {
    if (next_messages != nullptr) prefetch.add(next_messages + (L - 1) * FD, next_rows, row_bytes, message_bytes, false);
    prefetch.add(pr.h0 + next * FD, 1, block_bytes, 0, false);
  }
  if (half != 0) {
    prefetch.add(pr.grad_h0 + next * FD, 1, block_bytes, 0, true);
    if (next_messages != nullptr && L > 1)
      prefetch.add(next_messages + (L - 2) * FD, next_rows, row_bytes, message_bytes, false);
    prefetch.add(pr.grad_states + next * states_row, 1, next_rows * states_row * int64_t(sizeof(T)), 0, false);
    if (pr.grad_sum != nullptr) prefetch.add(pr.grad_sum + next * FD, 1, block_bytes, 0, false);
  }
}

// Work of the inner backward's register blocks in one layer, in source steps times block width:
// the sum over blocks of (j0 + kJb) * kJb.
template <int kJ>
int64_t inner_backward_work(int F) {
  int64_t work = 0;
  over_fields<kJ>(F, [&]<int kJb>(int j0) __attribute__((always_inline)) { work += int64_t(j0 + kJb) * kJb; });
  return work;
}

// The inner interaction's layers t = L..1 for the tile with the register blocks of
// inner_backward_block. Per block of target fields [j0, j0 + kJb), in increasing j0, one pass over
// the block's rows writes alpha_j = delta_j * h0_j (into `alpha`, kept in L1), adds
// delta_j * a^t_j to grad_h0_j (delta^L from the states' gradient directly) and rebuilds
// h^{t-1}_j = h0_j * a^{t-1}_j into h_buf (the block reads sources i < j0 + kJb only, all rebuilt
// by then); the block then starts delta^{t-1} of its fields. message(t): a^t of the tile's first
// sample, samples message_stride apart; next_messages as in plan_next_reads. ws: 3 (S, F, D)
// buffers. The blocks prefetch what plan_next_reads lists.
template <typename T, int kBytes, int kRegs, int kD, typename Message>
DAGFM_HD void inner_backward_layers(const PropagateBackwardParams<T>& pr, int64_t b, int S, T* grad_p,
                                    Message&& message, int64_t message_stride, const T* next_messages, T* ws,
                                    T* h_buf) {
  constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
  constexpr int kV = kD / Vec<T, kVB>::lanes;
  // kB samples per step: the vector registers left after the block's weights and gradients.
  constexpr int kJ = inner_backward_fields<T, kBytes, kRegs, kD>();
  constexpr int kVecRegs = kRegs >= 24 ? 32 : 16;
  constexpr int kFit = (kVecRegs - 4 - 2 * kJ * kV) / (2 * kV);
  constexpr int kB = kFit > 4 ? 4 : kFit > 1 ? kFit : 1;
  const int F = pr.num_fields, L = pr.depth;
  const int64_t FD = int64_t(F) * kD, states_row = int64_t(L + 1) * F;
  const TileRows<T> tile = tile_rows(pr, b, S, kD, ws);
  const T *h0 = tile.h0, *grad_states = tile.grad_states;
  T *delta = ws, *delta_prev = tile.delta_prev;
  const int64_t work = inner_backward_work<kJ>(F);
  LinePrefetcher prefetch;
  for (int t = L; t >= 1; --t) {
    const T* a = message(t);
    const T* a_prev = t > 1 ? message(t - 1) : nullptr;
    const T* h_prev = t > 1 ? h_buf : h0;
    plan_next_reads(prefetch, pr, b, S, t, message, message_stride, next_messages);
    prefetch.pace(work);
    const LayerRows<T> rows{h0, delta, a, a_prev, message_stride, grad_states + int64_t(L) * F, states_row,
                            tile.grad_sum, tile.grad_h0, h_buf, FD, S};
    const int64_t layer = (t - 1) * pr.layer_weight_numel();
    over_fields<kJ>(F, [&]<int kJb>(int j0) __attribute__((always_inline)) {
      layer_rows_at<T, kVB, kD>(t, L, rows, j0, kJb, tile.alpha, kJb * kD);
      inner_backward_block<T, kVB, kD, kJb, kB>(pr.p + layer, h_prev, tile.alpha, delta_prev, grad_p + layer,
                                                 grad_states + int64_t(t - 1) * F, states_row, tile.grad_sum, F,
                                                 j0, S, prefetch);
    });
    T* tmp = delta;
    delta = delta_prev;
    delta_prev = tmp;
  }
  finish_grad_h0(tile, delta);
}

// The outer interaction's layers t = L..1 for the tile, samples in lanes (outer_in_lanes, S >= kW / 2):
// per layer one pass over the rows (layer_rows: alpha, grad_h0, h^{t-1} into h_buf), then per
// group of kW samples the rows of h^{t-1} and alpha into lanes, every edge's dot products and the
// gradients (outer_backward_lanes, which also starts delta^{t-1}), prefetching what
// plan_next_reads lists. ws: 3 (S, F, D) buffers; scratch: outer_lanes_scratch_numel elements.
// message(t), message_stride and next_messages as in inner_backward_layers.
template <typename T, int kBytes, int kRegs, int kD, typename Message>
DAGFM_HD void outer_backward_layers(const PropagateBackwardParams<T>& pr, int64_t b, int S, T* grad_p, T* grad_q,
                                    Message&& message, int64_t message_stride, const T* next_messages, T* ws,
                                    T* h_buf, T* scratch) {
  constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
  constexpr int kW = Vec<T, kBytes>::lanes;
  const int F = pr.num_fields, L = pr.depth;
  const TileRows<T> tile = tile_rows(pr, b, S, kD, ws);
  const int64_t FD = int64_t(F) * kD, states_row = int64_t(L + 1) * F, layer = FD * F;
  T *delta = ws, *delta_prev = tile.delta_prev;
  T* hT = scratch;
  T* aT = hT + FD * kW;
  T* C = aT + FD * kW;
  T* R = C + int64_t(F) * F * kW;
  const int64_t groups = (S + kW - 1) / kW, edges = int64_t(F) * (F + 1) / 2;
  LinePrefetcher prefetch;
  for (int t = L; t >= 1; --t) {
    plan_next_reads(prefetch, pr, b, S, t, message, message_stride, next_messages);
    prefetch.pace(4 * edges * groups);
    const T* h_prev = t > 1 ? h_buf : tile.h0;
    const LayerRows<T> rows{tile.h0, delta, message(t), t > 1 ? message(t - 1) : nullptr, message_stride,
                            tile.grad_states + int64_t(L) * F, states_row, tile.grad_sum, tile.grad_h0, h_buf, FD, S};
    layer_rows_at<T, kVB, kD>(t, L, rows, 0, F, tile.alpha, FD);
    const int64_t off = (t - 1) * layer;
    for (int g = 0; g < S; g += kW) {
      const int n = S - g < kW ? S - g : kW;
      rows_to_lanes<T, kBytes>(h_prev + g * FD, FD, n, FD, hT);
      rows_to_lanes<T, kBytes>(tile.alpha + g * FD, FD, n, FD, aT);
      outer_edge_dots_lanes<T, kBytes, kD>(pr.p + off, pr.q + off, hT, aT, C, R, F, prefetch);
      outer_backward_lanes<T, kVB, kD, kW>(pr.p + off, h_prev, tile.alpha, C, R, delta_prev,
                                           tile.grad_states + int64_t(t - 1) * F, states_row, tile.grad_sum,
                                           grad_p + off, grad_q + off, F, g, n, prefetch);
    }
    T* tmp = delta;
    delta = delta_prev;
    delta_prev = tmp;
  }
  finish_grad_h0(tile, delta);
}
#endif

// One layer backward for the tile (outer, or the portable loops); arguments as dagfm_math.h's
// layer_backward, plus a_stride (the distance between two samples' rows of `a`: F*D, or L*F*D where
// a points into the kept messages; the portable loops take F*D only), `scratch`
// (outer_lanes_scratch_numel elements) and `first_layer` (the first layer of the backward, t = L:
// the vector loops then write grad_h0 instead of adding to it; the portable loops always add).
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void layer_backward_tile(Interaction kind, const T* p, const T* q, const T* h0,
                                  const T* h_prev, const T* a, int64_t a_stride, const T* delta,
                                  T* delta_prev, T* alpha, T* grad_h0, T* grad_p, T* grad_q, int F,
                                  int D, int S, T* scratch, bool first_layer) {
#ifdef DAGFM_CPU_VECTORS
  constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
  if constexpr (kVB > 0) {
    const int64_t FD = int64_t(F) * kD;
    if (kind == Interaction::Outer) {
      for (int s = 0; s < S; ++s) {
        const T* as = a + s * a_stride;
        const int64_t o = s * FD;
        T* gh = grad_h0 + o;
        DAGFM_SIMD
        for (int64_t k = 0; k < FD; ++k) {
          alpha[o + k] = delta[o + k] * h0[o + k];
          gh[k] = (first_layer ? T(0) : gh[k]) + delta[o + k] * as[k];
        }
      }
      // (outer_backward_layers runs the samples in lanes.) h_i and delta_prev_i of the sample stay
      // in registers across j, next to the edge's weights and gradients.
      for (int s = 0; s < S; ++s)
        outer_backward_sample<T, kVB, kD>(p, q, h_prev, alpha, delta_prev, grad_p, grad_q, F, s);
      return;
    }
  }
#endif
  layer_backward<T, T, kD>(kind, p, q, h0, h_prev, a, delta, delta_prev, alpha, grad_h0, grad_p,
                           grad_q, F, D, S);
}

// Backward of samples [b, b + S) into grad_h0 (its rows of pr.grad_h0) and the caller's weight
// gradient partials grad_p / grad_q; ws holds tile_workspace_numel(F, D, L, S) elements, scratch
// outer_lanes_scratch_numel(F, D).
// saved: the forward's messages, or nullptr to recompute them. The vector loops read them in place
// and rebuild one h^{t-1} = h0 * a^{t-1} per layer; the portable loops take copies.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void backward_tile(const PropagateBackwardParams<T>& pr, int64_t b, int S, T* grad_p,
                            T* grad_q, T* ws, const T* saved, T* scratch) {
  const int F = pr.num_fields, D = kD > 0 ? kD : pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D, SFD = S * FD;
  const int64_t layer_numel = pr.layer_weight_numel(), q_layer_numel = FD * F;
  auto H = [&](int t) { return ws + t * SFD; };
  auto A = [&](int t) { return ws + (L + t) * SFD; };
  const T* h0 = pr.h0 + b * FD;
  constexpr bool kVectorLayers = row_vector_bytes<T, kBytes, kD>() > 0;
  const bool in_place = saved != nullptr && kVectorLayers && pr.interaction != Interaction::Kernel;
  if (!in_place) {
    for (int64_t k = 0; k < SFD; ++k) H(0)[k] = h0[k];
    for (int t = 1; t <= L; ++t) {
      if (saved != nullptr) {
        for (int s = 0; s < S; ++s) {
          const T* src = saved + ((b + s) * L + t - 1) * FD;
          for (int64_t k = 0; k < FD; ++k) {
            A(t)[s * FD + k] = src[k];
            H(t)[s * FD + k] = h0[s * FD + k] * src[k];
          }
        }
      } else {
        layer_forward_tile<T, kBytes, kRegs, kD>(pr.interaction, pr.p + (t - 1) * layer_numel,
                                                 pr.q == nullptr ? nullptr : pr.q + (t - 1) * q_layer_numel,
                                                 h0, H(t - 1), A(t), H(t), F, D, S);
      }
    }
  }
  // The kept message a^t of the tile's first sample, and h^{t-1}.
  auto message = [&](int t) -> const T* { return in_place ? saved + (b * L + t - 1) * FD : A(t); };
  const int64_t message_stride = in_place ? L * FD : FD;
#ifdef DAGFM_CPU_VECTORS
  if constexpr (kVectorLayers) {
    // h^{t-1} rebuilt where h^0's copy was (the recomputed forward, if any, is done with it).
    const T* next_messages = in_place ? saved + (b + S) * L * FD : nullptr;
    if (pr.interaction == Interaction::Inner) {
      inner_backward_layers<T, kBytes, kRegs, kD>(pr, b, S, grad_p, message, message_stride, next_messages,
                                                  ws + (2 * L + 1) * SFD, H(0));
      return;
    }
    if constexpr (outer_in_lanes<T, kBytes, kRegs, kD>()) {
      if (pr.interaction == Interaction::Outer && 2 * S >= Vec<T, kBytes>::lanes) {
        outer_backward_layers<T, kBytes, kRegs, kD>(pr, b, S, grad_p, grad_q, message, message_stride,
                                                    next_messages, ws + (2 * L + 1) * SFD, H(0), scratch);
        return;
      }
    }
  }
#endif
  auto state = [&](int t) -> const T* {
    if (!in_place || t == 0) return in_place ? h0 : H(t);
    T* h = H(1);
    for (int s = 0; s < S; ++s) {
      const T* as = message(t) + s * message_stride;
      DAGFM_SIMD
      for (int64_t k = 0; k < FD; ++k) h[s * FD + k] = h0[s * FD + k] * as[k];
    }
    return h;
  };
  T* delta = ws + (2 * L + 1) * SFD;
  T* delta_prev = delta + SFD;
  T* alpha = delta_prev + SFD;
  T* grad_h0 = pr.grad_h0 + b * FD;
  const T* grad_states = pr.grad_states + b * int64_t(L + 1) * F;
  const T* grad_sum = pr.grad_sum == nullptr ? nullptr : pr.grad_sum + b * FD;  // dLoss/dz, every layer
  if (!kVectorLayers || pr.interaction == Interaction::Kernel)
    for (int64_t k = 0; k < SFD; ++k) grad_h0[k] = T(0);
  broadcast_deltas<T, kBytes, kD>(grad_states, L, delta, F, D, L, S, grad_sum);
  for (int t = L; t >= 1; --t) {
    broadcast_deltas<T, kBytes, kD>(grad_states, t - 1, delta_prev, F, D, L, S, grad_sum);
    layer_backward_tile<T, kBytes, kRegs, kD>(pr.interaction, pr.p + (t - 1) * layer_numel,
                                              pr.q == nullptr ? nullptr : pr.q + (t - 1) * q_layer_numel, h0,
                                              state(t - 1), message(t), message_stride, delta, delta_prev,
                                              alpha, grad_h0, grad_p + (t - 1) * layer_numel,
                                              grad_q == nullptr ? nullptr : grad_q + (t - 1) * q_layer_numel, F, D,
                                              S, scratch, t == L);
    T* tmp = delta;
    delta = delta_prev;
    delta_prev = tmp;
  }
  for (int64_t k = 0; k < SFD; ++k) grad_h0[k] += delta[k];
}

}  // namespace cpu
}  // namespace dagfm

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
