// One tile of S consecutive samples back through all L layers on the CPU: the register blocks of
// backward_blocks.h where the embedding size fits whole vectors, the portable loops of
// dagfm_math.h elsewhere. Template arguments as in tile.h.
#pragma once

#include <cstdint>

#include "../dagfm_math.h"
#include "../dagfm_params.h"
#include "backward_blocks.h"
#include "backward_prefetch.h"
#include "backward_rows.h"
#include "tile.h"

// The vector loops below are always inlined: no vector crosses an ABI boundary.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dagfm {
namespace cpu {

// Samples per backward tile: its passes over the rows of the work buffers (S x F*D values each)
// run from L2, and 16 samples keep them closer (a few percent faster than 32 for inner and outer,
// AVX-512 and AVX2 alike); a multiple of the 16 lanes of the outer lane groups.
constexpr int kBackwardRowTile = 16;

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

// Whether the outer backward runs with samples in lanes (outer_backward_layers): as the forward
// where it does, and on AVX2 too, where the register blocks spill a few vectors to L1 but still run
// about twice as fast as one sample at a time.
template <typename T, int kBytes, int kRegs, int kD>
constexpr bool outer_backward_in_lanes() {
  return outer_in_lanes<T, kBytes, kRegs, kD>() ||
         (kBytes == 32 && kD > 0 && kD <= 16 && row_vector_bytes<T, kBytes, kD>() > 0);
}

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

// The outer interaction's layers t = L..1 for the tile, samples in lanes (outer_backward_in_lanes,
// S >= kW / 2):
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
    if constexpr (outer_backward_in_lanes<T, kBytes, kRegs, kD>()) {
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

// Backward of samples [b0, b1), kBackwardRowTile at a time; ws holds backward_tiles_numel(F, D, L).
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void backward_tiles(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1, T* grad_p, T* grad_q,
                             T* ws, const T* saved) {
  T* scratch = ws + tile_workspace_numel(pr.num_fields, pr.embed_dim, pr.depth, kBackwardRowTile);
  for (int64_t b = b0; b < b1; b += kBackwardRowTile)
    backward_tile<T, kBytes, kRegs, kD>(pr, b, int(std::min<int64_t>(kBackwardRowTile, b1 - b)), grad_p, grad_q, ws,
                                        saved, scratch);
}

// Workspace of backward_tiles, in elements.
DAGFM_HD int64_t backward_tiles_numel(int F, int D, int L) {
  return tile_workspace_numel(F, D, L, kBackwardRowTile) + outer_lanes_scratch_numel(F, D);
}

}  // namespace cpu
}  // namespace dagfm

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
