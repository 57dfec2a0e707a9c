// The kernel interaction's BLAS path between its products: the passes over a tile of rows that
// turn messages into states (forward) and deltas into alpha and dh0 (backward). They are
// memory-bound, so each is one pass over the tile, compiled for the CPU's widest vectors (isa.h)
// with D fixed where with_static_embed_dim can.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../dagfm_math.h"
#include "isa.h"
#include "tile.h"
#include "vec.h"

namespace dagfm {

// out[j] = sum_d x[j * D + d] for the F fields of one row.
template <typename T, int kBytes, int kD>
DAGFM_HD void field_sums(const T* x, int F, int D, T* out) {
#if DAGFM_CPU_VECTORS
  constexpr int kVB = cpu::row_vector_bytes<T, kBytes, kD>();
  if constexpr (kVB > 0) {
    cpu::row_sums<T, kVB, kD>(x, F, out);
    return;
  }
#endif
  for (int j = 0; j < F; ++j) out[j] = sum(x + int64_t(j) * D, D);
}

// A forward tile after layer t's products (messages a, rows lda apart): h^t = h0 * a, its field
// sums into the states of layer t, and z += h^t. With t = 0 (a unused): the states of h0, z = h0.
template <typename T>
struct ForwardTileRows {
  int rows, F, D;
  int64_t states_row;  // (L + 1) F
  const T* h0;         // rows x FD
  T* states;           // the tile's first row of states
  T* z;                // rows x FD or nullptr
};

template <typename T, int kBytes, int kD>
DAGFM_HD void forward_rows_pass(const ForwardTileRows<T>& tr, int t, const T* a, int64_t lda, T* h) {
  const int D = kD > 0 ? kD : tr.D;
  const int64_t FD = int64_t(tr.F) * D;
  for (int64_t r = 0; r < tr.rows; ++r) {
    const T* h0r = tr.h0 + r * FD;
    T* st = tr.states + r * tr.states_row + int64_t(t) * tr.F;
    T* zr = tr.z == nullptr ? nullptr : tr.z + r * FD;
    if (t == 0) {
      field_sums<T, kBytes, kD>(h0r, tr.F, D, st);
      if (zr != nullptr) std::copy(h0r, h0r + FD, zr);
      continue;
    }
    const T* ar = a + r * lda;
    T* hr = h + r * FD;
    DAGFM_SIMD
    for (int64_t k = 0; k < FD; ++k) hr[k] = h0r[k] * ar[k];
    field_sums<T, kBytes, kD>(hr, tr.F, D, st);
    if (zr != nullptr) {
      DAGFM_SIMD
      for (int64_t k = 0; k < FD; ++k) zr[k] += hr[k];
    }
  }
}

// A backward tile before layer t's products (t = L..1), or after the last ones (t = 0). delta holds
// the delta product's part of delta^t (nothing for t = L); the full delta^t adds G[t] broadcast over
// d and dLoss/dz. Then alpha = delta^t * h0, dh0 (+)= delta^t * a^t and, for t >= 2,
// h^{t-1} = h0 * a^{t-1} for the weight gradient; with t = 0, dh0 += delta^0 and nothing else.
template <typename T>
struct BackwardTileRows {
  int rows, F, D, L;
  const T* h0;           // rows x FD
  const T* grad_states;  // rows x (L+1) F
  const T* grad_sum;     // rows x FD or nullptr
  const T* saved;        // the tile's messages: row r, layer t at (r L + t - 1) FD
  T* grad_h0;            // rows x FD
};

// The conditions are template arguments so that the inner loops carry no per-element tests
// (which compilers turn into masked vector code).
template <typename T, int kD, bool kProduct, bool kSum, bool kFirst>
DAGFM_HD void backward_rows_loop(const BackwardTileRows<T>& tr, int t, const T* delta, T* alpha, T* h_prev) {
  const int D = kD > 0 ? kD : tr.D;
  const int64_t FD = int64_t(tr.F) * D;
  for (int64_t r = 0; r < tr.rows; ++r) {
    const T* dr = delta + r * FD;
    const T* gz = tr.grad_sum + (kSum ? r * FD : 0);
    const T* g = tr.grad_states + (r * (tr.L + 1) + t) * tr.F;
    const T* h0r = tr.h0 + r * FD;
    const T* at = t == 0 ? nullptr : tr.saved + (r * tr.L + (t - 1)) * FD;
    T* al = alpha + r * FD;
    T* gh = tr.grad_h0 + r * FD;
    for (int j = 0; j < tr.F; ++j) {
      const int64_t o = int64_t(j) * D;
      const T gj = g[j];
      if (t == 0) {
        DAGFM_SIMD
        for (int e = 0; e < D; ++e) {
          T d = gj;
          if constexpr (kProduct) d += dr[o + e];
          if constexpr (kSum) d += gz[o + e];
          if constexpr (kFirst) gh[o + e] = d;
          else gh[o + e] += d;
        }
        continue;
      }
      DAGFM_SIMD
      for (int e = 0; e < D; ++e) {
        T d = gj;
        if constexpr (kProduct) d += dr[o + e];
        if constexpr (kSum) d += gz[o + e];
        al[o + e] = d * h0r[o + e];
        if constexpr (kFirst) gh[o + e] = d * at[o + e];
        else gh[o + e] += d * at[o + e];
      }
    }
    if (t >= 2) {
      T* hp = h_prev + r * FD;
      DAGFM_SIMD
      for (int64_t k = 0; k < FD; ++k) hp[k] = h0r[k] * at[k - FD];
    }
  }
}

template <typename T, int kBytes, int kD>
DAGFM_HD void backward_rows_pass(const BackwardTileRows<T>& tr, int t, const T* delta, T* alpha, T* h_prev) {
  const bool product = t < tr.L, first = t == tr.L;
  if (tr.grad_sum != nullptr) {
    if (first) backward_rows_loop<T, kD, false, true, true>(tr, t, delta, alpha, h_prev);
    else if (product) backward_rows_loop<T, kD, true, true, false>(tr, t, delta, alpha, h_prev);
  } else {
    if (first) backward_rows_loop<T, kD, false, false, true>(tr, t, delta, alpha, h_prev);
    else if (product) backward_rows_loop<T, kD, true, false, false>(tr, t, delta, alpha, h_prev);
  }
}

// Runs Pass::template run<kBytes, kD>(args...) compiled for the instruction set cpu_isa() picked.
template <typename Pass, int kD, typename... Args>
void run_pass_generic(Args... args) {
  Pass::template run<0, kD>(args...);
}
#if DAGFM_X86_DISPATCH
template <typename Pass, int kD, typename... Args>
DAGFM_TARGET_AVX2 void run_pass_avx2(Args... args) {
  Pass::template run<32, kD>(args...);
}
template <typename Pass, int kD, typename... Args>
DAGFM_TARGET_AVX512 void run_pass_avx512(Args... args) {
  Pass::template run<64, kD>(args...);
}
#endif

template <typename Pass, typename... Args>
void run_pass(int D, Args... args) {
  with_static_embed_dim(D, [&]<int kD>() {
#if DAGFM_X86_DISPATCH
    if (cpu_isa() == CpuIsa::Avx512) return run_pass_avx512<Pass, kD>(args...);
    if (cpu_isa() == CpuIsa::Avx2) return run_pass_avx2<Pass, kD>(args...);
#endif
    run_pass_generic<Pass, kD>(args...);
  });
}

template <typename T>
struct ForwardRowsPass {
  template <int kBytes, int kD>
  DAGFM_HD static void run(const ForwardTileRows<T>* tr, int t, const T* a, int64_t lda, T* h) {
    forward_rows_pass<T, kBytes, kD>(*tr, t, a, lda, h);
  }
};

template <typename T>
struct BackwardRowsPass {
  template <int kBytes, int kD>
  DAGFM_HD static void run(const BackwardTileRows<T>* tr, int t, const T* delta, T* alpha, T* h_prev) {
    backward_rows_pass<T, kBytes, kD>(*tr, t, delta, alpha, h_prev);
  }
};

}  // namespace dagfm
