// One tile of S consecutive samples through all L layers on the CPU: the register-blocked loops of
// forward_blocks.h where the embedding size fits whole vectors, the portable loops of dagfm_math.h elsewhere.
//
// kBytes: vector width the caller's target allows (0: portable loops only); kRegs: accumulator
// registers the blocks may use (24 of AVX-512's 32 vector registers, 12 of AVX2's 16); kD: the
// embedding size fixed at compile time (0: any, portable loops).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../dagfm_math.h"
#include "../dagfm_params.h"
#include "forward_blocks.h"
#include "forward_lanes.h"

namespace dagfm {
namespace cpu {

// Samples per tile: each weight loaded serves the tile's samples (in register blocks of 2 to 24)
// while the tile's states, 3 x kForwardTileRows x F*D values, stay in L2; a multiple of the 16
// lanes of the outer interaction's lane groups (no padded lanes in a whole tile).
constexpr int kForwardTileRows = 48;

#ifdef DAGFM_CPU_VECTORS
// Widest vector of at most kBytes that rows of kD values of T split into (0: none).
template <typename T, int kBytes, int kD>
constexpr int row_vector_bytes() {
  if constexpr (kBytes >= 64 && vectors_fit<T, 64, kD>()) return 64;
  if constexpr (kBytes >= 32 && vectors_fit<T, 32, kD>()) return 32;
  return 0;
}
#else
template <typename T, int kBytes, int kD>
constexpr int row_vector_bytes() { return 0; }
#endif

// Runs block<kM>(s0) over samples [0, S): blocks of kM, then of kM / 3, then single samples
// (a small batch still reuses each weight load for a few samples).
template <int kM, typename Block>
DAGFM_HD void over_samples(int S, Block&& block) {
  int s0 = 0;
  for (; s0 + kM <= S; s0 += kM) block.template operator()<kM>(s0);
  constexpr int kSmall = kM / 3 > 1 ? kM / 3 : 1;
  if constexpr (kSmall > 1)
    for (; s0 + kSmall <= S; s0 += kSmall) block.template operator()<kSmall>(s0);
  for (; s0 < S; ++s0) block.template operator()<1>(s0);
}

// Whether kernel_layer_columns runs for this type, vector width and embedding size.
template <typename T, int kBytes, int kD>
constexpr bool kernel_columns_vectorized() { return row_vector_bytes<T, kBytes, kD>() > 0; }

// Kernel interaction, one layer for the target fields [j_begin, j_end) of S samples into `out`
// (h_j = h0_j * a_j; a_j and z_j when asked; only where kernel_columns_vectorized). Each a_j sums
// over (i, d) in the same order whatever the block shape, the column range or the batch.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void kernel_layer_columns(const T* p, const T* h0, const T* h_prev, const LayerOut<T>& out, int F,
                                   int S, int j_begin, int j_end) {
#ifdef DAGFM_CPU_VECTORS
  constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
  if constexpr (kVB > 0) {
    constexpr int kV = kD / Vec<T, kVB>::lanes;
    constexpr int kJ = 2 / kV > 1 ? 2 / kV : 1;
    constexpr int kM = kRegs / (kJ * kV) > 1 ? kRegs / (kJ * kV) : 1;
    // Inlined, so that the blocks compile for the caller's instruction set.
    over_samples<kM>(S, [&]<int kMb>(int s0) __attribute__((always_inline)) {
      // Every accumulator is one chain of dependent FMAs: blocks of few samples take more fields,
      // so that at least 8 chains hide the FMA latency.
      constexpr int kWide = 8 / kV > 1 ? 8 / kV : 1;
      constexpr int kJb = kMb * kJ * kV >= 8 ? kJ : kWide;
      // The narrower blocks take the first fields, which have the fewest sources.
      int j0 = j_begin;
      const int wide_begin = j_end - (j_end - j_begin) / kJb * kJb;
      if constexpr (kJb > 2)
        for (; j0 + 2 <= wide_begin; j0 += 2) kernel_forward_block<T, kVB, kD, kMb, 2>(p, h0, h_prev, out, F, j0, s0);
      for (; j0 < wide_begin; ++j0) kernel_forward_block<T, kVB, kD, kMb, 1>(p, h0, h_prev, out, F, j0, s0);
      for (; j0 < j_end; j0 += kJb) kernel_forward_block<T, kVB, kD, kMb, kJb>(p, h0, h_prev, out, F, j0, s0);
    });
  }
#endif
}

// Per-thread buffer of the outer interaction's edge dots (layer_forward_tile's callers give no
// workspace for them); it only grows, so no call allocates once warm.
template <typename T>
T* outer_dots_workspace(int64_t numel) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < numel) buf.resize(numel);
  return buf.data();
}

// One layer forward for the tile into `out` (h = h0 * a; a and z when asked). a_scratch (S*F*D
// elements) holds the messages of the portable loops when out.a does not.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void layer_forward_out(Interaction kind, const T* p, const T* q, const T* h0, const T* h_prev,
                                const LayerOut<T>& out, int F, int D, int S, T* a_scratch) {
#ifdef DAGFM_CPU_VECTORS
  constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
  if constexpr (kVB > 0) {
    constexpr int kV = kD / Vec<T, kVB>::lanes;
    // Columns (fields x vectors) per block: 4 (inner) or 2 (kernel) on AVX-512, 2 on AVX2;
    // samples per block: what is left of kRegs accumulators.
    constexpr int kCols = kRegs >= 24 ? 4 : 2;
    if (kind == Interaction::Inner) {
      constexpr int kJ = kCols / kV > 1 ? kCols / kV : 1;
      constexpr int kM = kRegs / (kJ * kV) > 1 ? kRegs / (kJ * kV) : 1;
      over_samples<kM>(S, [&]<int kMb>(int s0) __attribute__((always_inline)) {
        // The odd fields first: the first fields have the fewest sources.
        int j0 = 0;
        for (; j0 < F % kJ; ++j0) inner_forward_block<T, kVB, kD, kMb, 1>(p, h0, h_prev, out, F, j0, s0);
        for (; j0 < F; j0 += kJ) inner_forward_block<T, kVB, kD, kMb, kJ>(p, h0, h_prev, out, F, j0, s0);
      });
      return;
    }
    if (kind == Interaction::Kernel) {
      kernel_layer_columns<T, kBytes, kRegs, kD>(p, h0, h_prev, out, F, S, 0, F);
      return;
    }
    // Outer: the edge dots of a block of samples, then their messages in blocks of fields as inner's.
    constexpr int kJ = kCols / kV > 1 ? kCols / kV : 1;
    constexpr int kM = kRegs / (kJ * kV) > 1 ? kRegs / (kJ * kV) : 1;
    T* dots = outer_dots_workspace<T>(kM * F * outer_dots_row<T, kVB>(F));
    over_samples<kM>(S, [&]<int kMb>(int s0) __attribute__((always_inline)) {
      outer_edge_dots<T, kVB, kD, kMb>(p, h_prev, F, s0, dots);
      // At least 8 chains of dependent FMAs where the registers allow: few samples take more fields.
      constexpr int kChains = (8 + kMb * kV - 1) / (kMb * kV), kMaxJ = kRegs / (kMb * kV);
      constexpr int kJb = std::max(kJ, std::min(kChains, kMaxJ));
      int j0 = 0;
      for (; j0 < F % kJb; ++j0) outer_messages_block<T, kVB, kD, kMb, 1>(q, dots, h0, out, F, j0, s0);
      for (; j0 < F; j0 += kJb) outer_messages_block<T, kVB, kD, kMb, kJb>(q, dots, h0, out, F, j0, s0);
    });
    return;
  }
#endif
  const int64_t FD = int64_t(F) * D, SFD = S * FD;
  T* a = out.a != nullptr && out.a_row == FD ? out.a : a_scratch;
  layer_forward<T, T, kD>(kind, p, q, h0, h_prev, a, out.h, F, D, S);
  if (out.a != nullptr && a != out.a)
    for (int s = 0; s < S; ++s)
      for (int64_t k = 0; k < FD; ++k) out.a[s * out.a_row + k] = a[s * FD + k];
  if (out.z != nullptr)
    for (int64_t k = 0; k < SFD; ++k) out.z[k] = (out.z_first ? h0[k] : out.z[k]) + out.h[k];
}

// One layer forward for the tile: a = messages into every field, h = h0 * a.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void layer_forward_tile(Interaction kind, const T* p, const T* q, const T* h0,
                                 const T* h_prev, T* a, T* h, int F, int D, int S) {
  LayerOut<T> out;
  out.h = h;
  out.a = a;
  out.a_row = int64_t(F) * D;
  layer_forward_out<T, kBytes, kRegs, kD>(kind, p, q, h0, h_prev, out, F, D, S, a);
}

// Whether the outer interaction runs with samples in lanes: a vector of samples per group, the
// kD accumulators of a_j within the register budget.
template <typename T, int kBytes, int kRegs, int kD>
constexpr bool outer_in_lanes() {
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && kBytes == 64 && kRegs >= 24 && kD > 0 && kD <= 16;
}

// The same for the forward, which also runs in lanes on AVX2 (h_i and a_j in register chunks).
template <typename T, int kBytes, int kRegs, int kD>
constexpr bool outer_forward_in_lanes() {
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && kD > 0 && kD <= 16 &&
         ((kBytes == 64 && kRegs >= 24) || (kBytes == 32 && kD % 4 == 0));
}

// Lane groups of the outer interaction's forward run together (each broadcast weight feeds one FMA
// per group): as many as the vector registers hold, 24 accumulators on AVX-512, 8 on AVX2.
template <int kBytes>
constexpr int outer_lane_groups() { return kBytes == 64 ? 3 : 2; }

// Largest divisor of kD of at most `most` (at least 1).
template <int kD>
constexpr int divisor_at_most(int most) {
  int d = most < kD ? most : kD;
  while (d > 1 && kD % d != 0) --d;
  return d;
}

// Workspace of forward_tile, in elements: two state buffers, the messages and the running sum z of
// S samples, or outer_forward_lanes' buffers (outer_lane_groups of 16 lanes at most).
DAGFM_HD int64_t forward_tile_numel(int F, int D, int S) {
  const int64_t rows = 4 * int64_t(S) * D * F, lanes = outer_lane_group_numel(F, D, 16) * outer_lane_groups<64>();
  return rows > lanes ? rows : lanes;
}

// Forward of samples [b, b + S): states, and when asked the messages a^1..a^L (saved, laid out
// (B, L, F, D)) and the sum z = h^0 + ... + h^L (pr.sum_out, (B, F, D)).
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void forward_tile(const PropagateParams<T>& pr, int64_t b, int S, T* ws, T* saved) {
  const int F = pr.num_fields, D = kD > 0 ? kD : pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D, SFD = S * FD, states_row = int64_t(L + 1) * F;
  const int64_t layer_numel = pr.layer_weight_numel(), q_layer_numel = FD * F;
  const T* h0 = pr.h0 + b * FD;
  T* states = pr.states + b * states_row;
  T* z = pr.sum_out == nullptr ? nullptr : pr.sum_out + b * FD;
#ifdef DAGFM_CPU_VECTORS
  if constexpr (outer_forward_in_lanes<T, kBytes, kRegs, kD>()) {
    constexpr int kW = Vec<T, kBytes>::lanes, kMaxG = outer_lane_groups<kBytes>(), kAccRegs = kBytes == 64 ? 24 : 8;
    // Half a vector of samples or more: lanes beat horizontal sums despite the padding.
    if (pr.interaction == Interaction::Outer && 2 * S >= kW) {
      // kG groups of kW samples from sample g: kE edges (dots) or kAcc of a_j's vectors per block.
      auto run = [&]<int kG>(int g, int n) __attribute__((always_inline)) {
        constexpr int kE = kAccRegs / kG < 16 ? kAccRegs / kG : 16, kAcc = divisor_at_most<kD>(kAccRegs / kG);
        outer_forward_lanes<T, kBytes, kD, kG, kE, kAcc>(
            pr.p, pr.q, h0 + g * FD, n, F, L, ws, states + g * states_row, states_row,
            saved == nullptr ? nullptr : saved + (b + g) * L * FD, z == nullptr ? nullptr : z + g * FD);
      };
      int g = 0;
      for (; S - g > (kMaxG - 1) * kW; g += kMaxG * kW) run.template operator()<kMaxG>(g, std::min(S - g, kMaxG * kW));
      if constexpr (kMaxG > 2)
        for (; S - g > kW; g += 2 * kW) run.template operator()<2>(g, std::min(S - g, 2 * kW));
      for (; g < S; g += kW) run.template operator()<1>(g, std::min(S - g, kW));
      return;
    }
  }
#endif
  T* hbuf[2] = {ws, ws + SFD};
  T* a = ws + 2 * SFD;
  // The register blocks stream the saved messages and the final z (outputs read only after the
  // call) and keep the running z in the workspace, so that no output line is read from memory.
  bool streams = false;
#ifdef DAGFM_CPU_VECTORS
  if constexpr (row_vector_bytes<T, kBytes, kD>() > 0) {
    streams = streamable<row_vector_bytes<T, kBytes, kD>()>(saved) &&
              streamable<row_vector_bytes<T, kBytes, kD>()>(z);
  }
#endif
  auto write_states = [&](const T* h, int t) __attribute__((always_inline)) {
#ifdef DAGFM_CPU_VECTORS
    constexpr int kVB = row_vector_bytes<T, kBytes, kD>();
    if constexpr (kVB > 0) {
      // Transposed sums of whole rows, each sample's straight into its row of the states.
      for (int s = 0; s < S; ++s) row_sums<T, kVB, kD>(h + s * FD, F, states + s * states_row + int64_t(t) * F);
      return;
    }
#endif
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < F; ++j) states[s * states_row + int64_t(t) * F + j] = sum(h + s * FD + int64_t(j) * D, D);
  };
  // The inner and outer register blocks write the states of layers 1..L themselves where
  // states_in_blocks; elsewhere, and for the kernel interaction (whose blocks the FMAs dominate),
  // they are summed from the stored rows. Layer 0's come from the first layer's blocks wherever
  // those run (on h0's first read from memory, which a pass of its own could not overlap). The
  // same bits either way.
  constexpr int kRowBytes = row_vector_bytes<T, kBytes, kD>();
  const bool blocks_write_states =
      kRowBytes > 0 && states_in_blocks<kRowBytes>() && pr.interaction != Interaction::Kernel;
  const bool blocks_sum_h0 = kRowBytes > 0 && L > 0;
  if (!blocks_sum_h0) write_states(h0, 0);
  if (z != nullptr && L == 0)
    for (int64_t k = 0; k < SFD; ++k) z[k] = h0[k];
  const T* h_prev = h0;
  for (int t = 1; t <= L; ++t) {
    LayerOut<T> out;
    out.h = hbuf[t & 1];
    out.a = saved == nullptr ? nullptr : saved + (b * L + t - 1) * FD;
    out.a_row = L * FD;
    out.z = streams && z != nullptr ? ws + 3 * SFD : z;
    out.z_first = t == 1;
    out.z_out = streams && t == L ? z : nullptr;
    out.a_stream = streams;
    out.states_row = states_row;
    if (blocks_write_states) out.states = states + int64_t(t) * F;
    if (blocks_sum_h0 && t == 1) out.states0 = states;
    layer_forward_out<T, kBytes, kRegs, kD>(pr.interaction, pr.p + (t - 1) * layer_numel,
                                            pr.q == nullptr ? nullptr : pr.q + (t - 1) * q_layer_numel, h0,
                                            h_prev, out, F, D, S, a);
    if (!blocks_write_states) write_states(out.h, t);
    h_prev = out.h;
  }
}

// Forward of samples [b0, b1), kForwardTileRows at a time, in the workspace of one thread.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void forward_tiles(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws, T* saved) {
  for (int64_t b = b0; b < b1; b += kForwardTileRows)
    forward_tile<T, kBytes, kRegs, kD>(pr, b, int(std::min<int64_t>(kForwardTileRows, b1 - b)), ws, saved);
#ifdef DAGFM_CPU_VECTORS
  stream_fence();  // the tiles stream saved messages and z (vstream)
#endif
}

}  // namespace cpu
}  // namespace dagfm
