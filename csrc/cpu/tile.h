// One tile of S consecutive samples through all L layers on the CPU: the register-blocked loops of
// vec.h where the embedding size fits whole vectors, the portable loops of dagfm_math.h elsewhere.
//
// kBytes: vector width the caller's target allows (0: portable loops only); kRegs: accumulator
// registers the blocks may use (24 of AVX-512's 32 vector registers, 12 of AVX2's 16); kD: the
// embedding size fixed at compile time (0: any, portable loops).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../dagfm_math.h"
#include "../dagfm_params.h"
#include "vec.h"

namespace dagfm {
namespace cpu {

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

// One layer forward for the tile: a = messages into every field, h = h0 * a.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void layer_forward_tile(Interaction kind, const T* p, const T* q, const T* h0,
                                 const T* h_prev, T* a, T* h, int F, int D, int S) {
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
      over_samples<kM>(S, [&]<int kMb>(int s0) {
        int j0 = 0;
        for (; j0 + kJ <= F; j0 += kJ) inner_forward_block<T, kVB, kD, kMb, kJ>(p, h0, h_prev, a, h, F, j0, s0);
        for (; j0 < F; ++j0) inner_forward_block<T, kVB, kD, kMb, 1>(p, h0, h_prev, a, h, F, j0, s0);
      });
      return;
    }
    if (kind == Interaction::Kernel) {
      constexpr int kJ = 2 / kV > 1 ? 2 / kV : 1;
      constexpr int kM = kRegs / (kJ * kV) > 1 ? kRegs / (kJ * kV) : 1;
      over_samples<kM>(S, [&]<int kMb>(int s0) {
        int j0 = 0;
        for (; j0 + kJ <= F; j0 += kJ) kernel_forward_block<T, kVB, kD, kMb, kJ>(p, h0, h_prev, a, h, F, j0, s0);
        for (; j0 < F; ++j0) kernel_forward_block<T, kVB, kD, kMb, 1>(p, h0, h_prev, a, h, F, j0, s0);
      });
      return;
    }
    constexpr int kM = kRegs / (3 * kV) > 1 ? kRegs / (3 * kV) : 1;
    over_samples<kM>(S, [&]<int kMb>(int s0) {
      for (int j = 0; j < F; ++j) outer_forward_block<T, kVB, kD, kMb>(p, q, h0, h_prev, a, h, F, j, s0);
    });
    return;
  }
#endif
  layer_forward<T, T, kD>(kind, p, q, h0, h_prev, a, h, F, D, S);
}

// Whether the outer interaction runs with samples in lanes: a vector of samples per group, the
// kD accumulators of a_j within the register budget.
template <typename T, int kBytes, int kRegs, int kD>
constexpr bool outer_in_lanes() {
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && kBytes == 64 && kRegs >= 24 && kD > 0 && kD <= 16;
}

// Workspace of forward_tile, in elements: two state buffers and the messages, or the three
// (F, D) x 16-lane buffers of outer_forward_lanes.
DAGFM_HD int64_t forward_tile_numel(int F, int D, int S) { return (3 * int64_t(S) + 48) * F * D; }


// Forward of samples [b, b + S): states (and, when saved != nullptr, the messages a^1..a^L laid
// out (B, L, F, D)) written to the outputs of pr.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void forward_tile(const PropagateParams<T>& pr, int64_t b, int S, T* ws, T* saved) {
  const int F = pr.num_fields, D = kD > 0 ? kD : pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D, SFD = S * FD, states_row = int64_t(L + 1) * F;
  const int64_t layer_numel = pr.layer_weight_numel(), q_layer_numel = FD * F;
  const T* h0 = pr.h0 + b * FD;
  T* states = pr.states + b * states_row;
  T* hbuf[2] = {ws, ws + SFD};
  T* a = ws + 2 * SFD;
  auto write_states = [&](const T* h, int t) {
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < F; ++j) states[s * states_row + int64_t(t) * F + j] = sum(h + s * FD + int64_t(j) * D, D);
  };
#ifdef DAGFM_CPU_VECTORS
  if constexpr (outer_in_lanes<T, kBytes, kRegs, kD>()) {
    constexpr int kW = Vec<T, kBytes>::lanes;
    // Half a vector of samples or more: lanes beat horizontal sums despite the padding.
    if (pr.interaction == Interaction::Outer && 2 * S >= kW) {
      for (int g = 0; g < S; g += kW) {
        const int n = S - g < kW ? S - g : kW;
        for (int64_t k = 0; k < FD; ++k)
          for (int lane = 0; lane < kW; ++lane) ws[k * kW + lane] = lane < n ? h0[(g + lane) * FD + k] : T(0);
        outer_forward_lanes<T, kBytes, kD>(pr.p, pr.q, ws, F, L, n, states + g * states_row, states_row,
                                           saved == nullptr ? nullptr : saved + (b + g) * L * FD);
      }
      return;
    }
  }
#endif
  write_states(h0, 0);
  const T* h_prev = h0;
  for (int t = 1; t <= L; ++t) {
    T* h = hbuf[t & 1];
    layer_forward_tile<T, kBytes, kRegs, kD>(pr.interaction, pr.p + (t - 1) * layer_numel,
                                             pr.q == nullptr ? nullptr : pr.q + (t - 1) * q_layer_numel,
                                             h0, h_prev, a, h, F, D, S);
    write_states(h, t);
    if (saved != nullptr)
      for (int s = 0; s < S; ++s) {
        T* dst = saved + ((b + s) * L + t - 1) * FD;
        for (int64_t k = 0; k < FD; ++k) dst[k] = a[s * FD + k];
      }
    h_prev = h;
  }
}

}  // namespace cpu
}  // namespace dagfm
