// The kernel interaction as BLAS products over field groups of the block-upper-triangular
// weight, split at the diagonal so that no product multiplies a block below it: the forward at
// large batches and the backward at D >= kBlasMinEmbedDim.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "../dagfm_math.h"
#include "../dagfm_params.h"
#include "blas.h"
#include "work_split.h"

namespace dagfm {

// Below this embedding size the backward's tile loops beat BLAS calls on tiny (D-wide) blocks.
constexpr int kBlasMinEmbedDim = 8;
// Kernel interaction: from this batch size the forward runs as BLAS products on tiles of rows.
constexpr int64_t kBlasForwardMinBatch = 512;
constexpr int64_t kBlasTileRows = 64;
// Rows per backward BLAS tile: a long inner dimension for the dW products, capped by its workspace.
constexpr int64_t kBackwardTileRows = 256;
constexpr int64_t kBackwardWorkspaceBytes = int64_t(8) << 20;

template <typename T>
void hadamard_row(const T* x, const T* y, int64_t n, T* out) {
  DAGFM_SIMD
  for (int64_t k = 0; k < n; ++k) out[k] = x[k] * y[k];
}

// Dense weight per layer: rows (i, d), columns (j, e), block (i, j) = W[i, j] for i <= j. The
// blocks below the diagonal are left unset: no product reads them.
template <typename T>
std::unique_ptr<T[]> pack_block_triangular(const T* w, int F, int D, int L) {
  const int64_t FD = int64_t(F) * D;
  std::unique_ptr<T[]> big(new T[int64_t(L) * FD * FD]);
  at::parallel_for(0, int64_t(L) * F, grain_for(2 * F * int64_t(D) * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / F;
      const int i = int(r % F);
      for (int d = 0; d < D; ++d) {
        T* row = big.get() + t * FD * FD + (int64_t(i) * D + d) * FD;
        for (int j = i; j < F; ++j) {
          const T* src = w + ((t * F + i) * F + j) * int64_t(D) * D + int64_t(d) * D;
          std::copy(src, src + D, row + int64_t(j) * D);
        }
      }
    }
  });
  return big;
}

// Field groups per BLAS call: wide enough for an efficient product; the triangle of blocks next
// to the diagonal goes field by field.
inline int fields_per_group(int D) { return std::max(1, 64 / D); }

// a (rows x FD) = h_prev (rows x FD) @ W (block upper triangular), by column groups: the fields
// before the group in one product, the diagonal triangle field by field (no block below the
// diagonal is multiplied: Inf * 0 is NaN).
template <typename T>
void kernel_layer_product(const T* h_prev, const T* w, int rows, int F, int D, T* a) {
  const int FD = F * D, G = fields_per_group(D);
  for (int g0 = 0; g0 < F; g0 += G) {
    const int g1 = std::min(F, g0 + G);
    if (g0 > 0)
      gemm_rowmajor<T>(false, false, rows, (g1 - g0) * D, g0 * D, h_prev, FD, w + g0 * D, FD, T(0), a + g0 * D, FD);
    else
      for (int r = 0; r < rows; ++r) std::fill_n(a + int64_t(r) * FD, g1 * D, T(0));
    for (int j = g0; j < g1; ++j)
      gemm_rowmajor<T>(false, false, rows, D, (j - g0 + 1) * D, h_prev + g0 * D, FD,
                       w + int64_t(g0) * D * FD + j * D, FD, T(1), a + j * D, FD);
  }
}

// Large batches of the kernel interaction: MKL's products beat the tile loops there, and packing
// the weights once per call is a small share of the work. saved as in forward_rows.
template <typename T>
void forward_kernel_blas(const PropagateParams<T>& pr, T* saved) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D, states_row = int64_t(L + 1) * F;
  const std::unique_ptr<T[]> w = pack_block_triangular(pr.p, F, D, L);
  const int64_t num_tiles = (pr.batch + kBlasTileRows - 1) / kBlasTileRows;
  at::parallel_for(0, num_tiles, grain_for(per_row_flops(pr) * kBlasTileRows), [&](int64_t tile0, int64_t tile1) {
    SingleThreadedBlas single;
    T* buf = thread_workspace<T>(3 * kBlasTileRows * FD);
    T* hb[2] = {buf, buf + kBlasTileRows * FD};
    T* a = buf + 2 * kBlasTileRows * FD;
    auto write_states = [&](const T* h, int64_t rows, T* states) {
      for (int64_t r = 0; r < rows; ++r)
        for (int j = 0; j < F; ++j) states[r * states_row + j] = sum(h + (r * F + j) * D, D);
    };
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kBlasTileRows;
      const int rows = int(std::min(kBlasTileRows, pr.batch - r0));
      const T* h0 = pr.h0 + r0 * FD;
      T* states = pr.states + r0 * states_row;
      T* z = pr.sum_out == nullptr ? nullptr : pr.sum_out + r0 * FD;
      write_states(h0, rows, states);
      if (z != nullptr) std::copy(h0, h0 + rows * FD, z);
      const T* h_prev = h0;
      for (int t = 1; t <= L; ++t) {
        T* h = hb[t & 1];
        kernel_layer_product(h_prev, w.get() + (t - 1) * FD * FD, rows, F, D, a);
        hadamard_row(h0, a, rows * FD, h);
        if (z != nullptr) {
          DAGFM_SIMD
          for (int64_t k = 0; k < rows * FD; ++k) z[k] += h[k];
        }
        if (saved != nullptr)
          for (int r = 0; r < rows; ++r)
            std::copy(a + r * FD, a + (r + 1) * FD, saved + ((r0 + r) * L + (t - 1)) * FD);
        write_states(h, rows, states + int64_t(t) * F);
        h_prev = h;
      }
    }
  });
}

// saved (nullable): the forward's messages (B, L, F, D); without them the caller recomputes them.
template <typename T>
void backward_kernel_blas(const PropagateBackwardParams<T>& pr, const T* saved) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D;
  const int64_t layer_big = FD * FD;
  const std::unique_ptr<T[]> w = pack_block_triangular(pr.p, F, D, L);
  const ChunkPlan plan = plan_gradient_chunks(pr.batch, L * layer_big * int64_t(sizeof(T)));
  std::vector<T> partials(plan.num_chunks * L * layer_big, T(0));
  const int G = fields_per_group(D);

  at::parallel_for(0, plan.num_chunks, grain_for(3 * per_row_flops(pr) * plan.chunk_rows), [&](int64_t c0, int64_t c1) {
    SingleThreadedBlas single;
    // Larger tiles give the dW products a longer inner dimension; cap the workspace per thread.
    const int64_t R = std::clamp<int64_t>(kBackwardWorkspaceBytes / ((L + 4) * FD * int64_t(sizeof(T))), 8,
                                          kBackwardTileRows);
    // h^0..h^(L-1), delta, delta_prev, alpha, each R x FD.
    T* buf = thread_workspace<T>((L + 3) * R * FD);
    auto H = [&](int t) { return buf + t * R * FD; };
    T* delta = buf + L * R * FD;
    T* delta_prev = delta + R * FD;
    T* alpha = delta_prev + R * FD;
    for (int64_t c = c0; c < c1; ++c) {
      T* dw = partials.data() + c * L * layer_big;
      const int64_t c_end = std::min(pr.batch, (c + 1) * plan.chunk_rows);
      for (int64_t r0 = c * plan.chunk_rows; r0 < c_end; r0 += R) {
        const int rows = int(std::min(R, c_end - r0));
        const int64_t n = rows * FD;
        const T* h0 = pr.h0 + r0 * FD;
        const T* gs = pr.grad_states + r0 * (L + 1) * F;
        auto message = [&](int t) { return saved + (r0 * L + (t - 1)) * FD; };  // row r at + r * L * FD
        std::copy(h0, h0 + n, H(0));
        for (int t = 1; t < L; ++t)
          for (int r = 0; r < rows; ++r)
            hadamard_row(h0 + r * FD, message(t) + int64_t(r) * L * FD, FD, H(t) + r * FD);
        const T* gsum = pr.grad_sum == nullptr ? nullptr : pr.grad_sum + r0 * FD;
        auto broadcast_grad = [&](int t, T* out) {
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < F; ++j)
              std::fill_n(out + (int64_t(r) * F + j) * D, D, gs[int64_t(r) * (L + 1) * F + int64_t(t) * F + j]);
          if (gsum != nullptr)
            for (int64_t k = 0; k < n; ++k) out[k] += gsum[k];
        };
        T* gh0 = pr.grad_h0 + r0 * FD;
        std::fill(gh0, gh0 + n, T(0));
        broadcast_grad(L, delta);
        for (int t = L; t >= 1; --t) {
          const T* wt = w.get() + (t - 1) * layer_big;
          T* dwt = dw + (t - 1) * layer_big;
          for (int r = 0; r < rows; ++r) {
            const T* at_ = message(t) + int64_t(r) * L * FD;
            const T* h0r = h0 + r * FD;
            T* dr = delta + r * FD;
            T* al = alpha + r * FD;
            T* g = gh0 + r * FD;
            DAGFM_SIMD
            for (int64_t k = 0; k < FD; ++k) {
              al[k] = dr[k] * h0r[k];
              g[k] += dr[k] * at_[k];
            }
          }
          const T* hp = H(t - 1);
          for (int g0 = 0; g0 < F; g0 += G) {
            const int g1 = std::min(F, g0 + G);
            // dW[fields < g0, group] += h^{t-1}[:, fields < g0]^T @ alpha[:, group]
            gemm_rowmajor<T>(true, false, g0 * D, (g1 - g0) * D, rows, hp, int(FD), alpha + g0 * D, int(FD),
                             T(1), dwt + g0 * D, int(FD));
            // the diagonal triangle: dW[g0..j, j] += h^{t-1}[:, g0..j]^T @ alpha[:, j]
            for (int j = g0; j < g1; ++j)
              gemm_rowmajor<T>(true, false, (j - g0 + 1) * D, D, rows, hp + g0 * D, int(FD), alpha + j * D,
                               int(FD), T(1), dwt + int64_t(g0) * D * FD + j * D, int(FD));
          }
          // delta^{t-1}[:, group] = G[t-1] + alpha[:, fields >= i] @ W[group, fields >= i]^T
          broadcast_grad(t - 1, delta_prev);
          for (int i0 = 0; i0 < F; i0 += G) {
            const int i1 = std::min(F, i0 + G);
            if (i1 < F)
              gemm_rowmajor<T>(false, true, rows, (i1 - i0) * D, (F - i1) * D, alpha + i1 * D, int(FD),
                               wt + int64_t(i0) * D * FD + i1 * D, int(FD), T(1), delta_prev + i0 * D, int(FD));
            for (int i = i0; i < i1; ++i)
              gemm_rowmajor<T>(false, true, rows, D, (i1 - i) * D, alpha + i * D, int(FD),
                               wt + int64_t(i) * D * FD + i * D, int(FD), T(1), delta_prev + i * D, int(FD));
          }
          std::swap(delta, delta_prev);
        }
        DAGFM_SIMD
        for (int64_t k = 0; k < n; ++k) gh0[k] += delta[k];
      }
    }
  });

  // Sum the chunk partials in order and unpack the upper blocks; the lower triangle stays zero.
  at::parallel_for(0, int64_t(L) * F, grain_for(2 * F * int64_t(D) * D * plan.num_chunks), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / F;
      const int i = int(r % F);
      T* out_i = pr.grad_p + (t * F + i) * F * int64_t(D) * D;
      std::fill(out_i, out_i + int64_t(i) * D * D, T(0));
      for (int d = 0; d < D; ++d) {
        const int64_t row = t * layer_big + (int64_t(i) * D + d) * FD;
        for (int j = i; j < F; ++j) {
          T* out = out_i + (int64_t(j) * D + d) * D;
          const T* src = partials.data() + row + int64_t(j) * D;
          std::copy(src, src + D, out);
          for (int64_t c = 1; c < plan.num_chunks; ++c) {
            const T* part = src + c * L * layer_big;
            for (int e = 0; e < D; ++e) out[e] += part[e];
          }
        }
      }
    }
  });
}

template <typename T>
bool use_kernel_blas(const PropagateParams<T>& pr) {
  return pr.interaction == Interaction::Kernel && pr.embed_dim >= kBlasMinEmbedDim &&
         int64_t(pr.num_fields) * pr.embed_dim <= (int64_t(1) << 15) && blas_available<T>();
}

}  // namespace dagfm
