// The kernel interaction as BLAS products over the block-upper-triangular weight, cut into
// rectangles above the diagonal so that no product multiplies a block below it: the forward at
// large batches and the backward at D >= kBlasMinEmbedDim from a few samples on. The passes between
// the products are in kernel_blas_passes.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dagfm_math.h"
#include "../dagfm_params.h"
#include "blas.h"
#include "kernel_blas_passes.h"
#include "work_split.h"

namespace dagfm {

// Below this embedding size the backward's tile loops beat BLAS calls on tiny (D-wide) blocks.
constexpr int kBlasMinEmbedDim = 8;
// Kernel interaction: from this batch size the forward runs as BLAS products on tiles of rows.
constexpr int64_t kBlasForwardMinBatch = 512;
// Kernel interaction: from this batch size the backward runs as BLAS products; below it, packing
// the weights and unpacking their gradient cost more than the tile loops' whole backward.
constexpr int64_t kBlasBackwardMinBatch = 4;
// Forward rows per tile: long products, while the tile's h, a and h0 stay in cache next to a layer's weight.
constexpr int64_t kBlasTileRows = 128;
// Rows per backward BLAS tile: long enough an inner dimension for the dW products (128 rows took
// 1.03-1.09x the time of 256), short enough that the tile's alpha and h^{t-1} (1.25 MB at
// F*D = 624) stay in L2 next to a layer's weight and its gradient.
constexpr int64_t kBackwardTileRows = 256;
// Tiles that go down the layers together (their delta waits between the layers: a bounded buffer).
constexpr int64_t kBackwardGroupTiles = 8;

// Dense weight per layer: rows (i, d), columns (j, e), block (i, j) = W[i, j] for i <= j. The
// blocks below the diagonal are left unset: no product reads them.
template <typename T>
void pack_block_triangular(const T* w, int F, int D, int L, T* big) {
  const int64_t FD = int64_t(F) * D;
  at::parallel_for(0, int64_t(L) * F, grain_for(2 * F * int64_t(D) * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / F;
      const int i = int(r % F);
      for (int d = 0; d < D; ++d) {
        T* row = big + t * FD * FD + (int64_t(i) * D + d) * FD;
        for (int j = i; j < F; ++j) {
          const T* src = w + ((t * F + i) * F + j) * int64_t(D) * D + int64_t(d) * D;
          std::copy(src, src + D, row + int64_t(j) * D);
        }
      }
    }
  });
}

// The calling thread's buffer for the packed weights (megabytes, kept between calls:
// thread_workspace); the gradient partials take work_split.h's GradientPartialsBuffer.
struct PackedWeightsBuffer;

template <typename T>
const T* packed_weights(const T* w, int F, int D, int L) {
  const int64_t FD = int64_t(F) * D;
  T* big = thread_workspace<T, PackedWeightsBuffer>(int64_t(L) * FD * FD);
  pack_block_triangular(w, F, D, L, big);
  return big;
}

// The block upper triangle over fields [0, F) cut into dense products: the rectangle of sources
// [f0, m) x targets [m, f1), then the halves [f0, m) and [m, f1) likewise, down to leaves of at most
// kLeafFields fields. Every rectangle lies above the diagonal and the pieces cover each block i <= j
// once, so nothing is multiplied twice or below the diagonal (Inf * 0 is NaN), and most of the
// work runs in a few large products. Listed in pre-order: a rectangle comes before every piece
// inside its target columns.
constexpr int kLeafFields = 2;

struct FieldRect {
  int i0, i1, j0, j1;  // sources [i0, i1) x targets [j0, j1), i1 <= j0 (a rectangle) or a leaf i0 == j0
  bool leaf() const { return i0 == j0; }
};

inline void split_triangle(int f0, int f1, std::vector<FieldRect>& out) {
  if (f1 - f0 <= kLeafFields) {
    if (f1 > f0) out.push_back({f0, f1, f0, f1});
    return;
  }
  const int m = (f0 + f1 + 1) / 2;
  out.push_back({f0, m, m, f1});
  split_triangle(f0, m, out);
  split_triangle(m, f1, out);
}

inline std::vector<FieldRect> triangle_pieces(int F) {
  std::vector<FieldRect> pieces;
  split_triangle(0, F, pieces);
  return pieces;
}

// a (rows x FD, row stride lda) = h_prev (rows x FD) @ W (block upper triangular, FD x FD). The
// pieces with sources from field 0 are the first to write their columns (pre-order), so they set
// them and the others add.
template <typename T>
void kernel_layer_product(const std::vector<FieldRect>& pieces, const T* h_prev, const T* w, int rows, int F,
                          int D, T* a, int lda) {
  const int FD = F * D;
  for (const FieldRect& pc : pieces) {
    const T beta = pc.i0 == 0 ? T(0) : T(1);
    if (!pc.leaf()) {
      gemm_rowmajor<T>(false, false, rows, (pc.j1 - pc.j0) * D, (pc.i1 - pc.i0) * D, h_prev + pc.i0 * D, FD,
                       w + int64_t(pc.i0) * D * FD + pc.j0 * D, FD, beta, a + pc.j0 * D, lda);
      continue;
    }
    // a leaf, target by target: a[:, j] (+)= h[:, i0..j] @ W[i0..j, j]
    for (int j = pc.j0; j < pc.j1; ++j)
      gemm_rowmajor<T>(false, false, rows, D, (j - pc.i0 + 1) * D, h_prev + pc.i0 * D, FD,
                       w + int64_t(pc.i0) * D * FD + j * D, FD, beta, a + j * D, lda);
  }
}

// dW (FD x FD, upper blocks) (+)= h_prev (rows x FD)^T @ alpha (rows x FD); beta 0 sets the blocks.
template <typename T>
void kernel_weight_grad_product(const std::vector<FieldRect>& pieces, const T* h_prev, const T* alpha, int rows,
                                int F, int D, T beta, T* dw) {
  const int FD = F * D;
  for (const FieldRect& pc : pieces) {
    if (!pc.leaf()) {
      gemm_rowmajor<T>(true, false, (pc.i1 - pc.i0) * D, (pc.j1 - pc.j0) * D, rows, h_prev + pc.i0 * D, FD,
                       alpha + pc.j0 * D, FD, beta, dw + int64_t(pc.i0) * D * FD + pc.j0 * D, FD);
      continue;
    }
    for (int j = pc.j0; j < pc.j1; ++j)
      gemm_rowmajor<T>(true, false, (j - pc.i0 + 1) * D, D, rows, h_prev + pc.i0 * D, FD, alpha + j * D, FD,
                       beta, dw + int64_t(pc.i0) * D * FD + j * D, FD);
  }
}

// delta (rows x FD) = alpha (rows x FD) @ W^T (W block upper triangular): source i gathers its
// targets j >= i. The pieces with targets up to field F - 1 are the first to write their source
// columns (pre-order), so they set them and the others add.
template <typename T>
void kernel_delta_product(const std::vector<FieldRect>& pieces, const T* alpha, const T* w, int rows, int F, int D,
                          T* delta) {
  const int FD = F * D;
  for (const FieldRect& pc : pieces) {
    const T beta = pc.j1 == F ? T(0) : T(1);
    if (!pc.leaf()) {
      gemm_rowmajor<T>(false, true, rows, (pc.i1 - pc.i0) * D, (pc.j1 - pc.j0) * D, alpha + pc.j0 * D, FD,
                       w + int64_t(pc.i0) * D * FD + pc.j0 * D, FD, beta, delta + pc.i0 * D, FD);
      continue;
    }
    // a leaf, source by source: delta[:, i] (+)= alpha[:, i..j1) @ W[i, i..j1)^T
    for (int i = pc.i0; i < pc.i1; ++i)
      gemm_rowmajor<T>(false, true, rows, D, (pc.j1 - i) * D, alpha + i * D, FD,
                       w + int64_t(i) * D * FD + i * D, FD, beta, delta + i * D, FD);
  }
}

// Large batches of the kernel interaction: MKL's products beat the tile loops there, and packing
// the weights once per call is a small share of the work. saved as in forward_rows: the products
// write the messages there directly.
template <typename T>
void forward_kernel_blas(const PropagateParams<T>& pr, T* saved) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D, states_row = int64_t(L + 1) * F;
  const T* w = packed_weights(pr.p, F, D, L);
  const std::vector<FieldRect> pieces = triangle_pieces(F);
  const int64_t num_tiles = (pr.batch + kBlasTileRows - 1) / kBlasTileRows;
  at::parallel_for(0, num_tiles, grain_for(per_row_flops(pr) * kBlasTileRows), [&](int64_t tile0, int64_t tile1) {
    SingleThreadedBlas single;
    T* buf = thread_workspace<T>(3 * kBlasTileRows * FD);
    T* hb[2] = {buf, buf + kBlasTileRows * FD};
    T* a_buf = buf + 2 * kBlasTileRows * FD;
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kBlasTileRows;
      const ForwardTileRows<T> tr{int(std::min(kBlasTileRows, pr.batch - r0)), F, D, states_row, pr.h0 + r0 * FD,
                                  pr.states + r0 * states_row,
                                  pr.sum_out == nullptr ? nullptr : pr.sum_out + r0 * FD};
      run_pass<ForwardRowsPass<T>>(D, &tr, 0, tr.h0, FD, static_cast<T*>(nullptr));
      const T* h_prev = tr.h0;
      for (int t = 1; t <= L; ++t) {
        T* h = hb[t & 1];
        T* a = saved == nullptr ? a_buf : saved + (r0 * L + (t - 1)) * FD;
        const int64_t lda = saved == nullptr ? FD : L * FD;
        kernel_layer_product(pieces, h_prev, w + (t - 1) * FD * FD, tr.rows, F, D, a, int(lda));
        run_pass<ForwardRowsPass<T>>(D, &tr, t, static_cast<const T*>(a), lda, h);
        h_prev = h;
      }
    }
  });
}

// saved: the forward's messages (B, L, F, D).
template <typename T>
void backward_kernel_blas(const PropagateBackwardParams<T>& pr, const T* saved) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D;
  const int64_t layer_big = FD * FD;
  const T* w = packed_weights(pr.p, F, D, L);
  const std::vector<FieldRect> pieces = triangle_pieces(F);
  // The chunks are fixed by the shapes, as in backward_rows; a chunk's last tile may be shorter.
  const ChunkPlan plan = plan_gradient_chunks(pr.batch, L * layer_big * int64_t(sizeof(T)));
  const int64_t R = std::min(kBackwardTileRows, plan.chunk_rows);
  // Each chunk's first tile sets its partial's upper blocks (beta 0), and only those are read.
  T* partials = thread_workspace<T, GradientPartialsBuffer>(plan.num_chunks * L * layer_big);

  // A group of tiles goes down the layers one at a time, tile after tile: layer t's weight and
  // its gradient (the products' large operands) stay in cache for the whole group, and only the
  // group's delta (delta^{t-1} written over delta^t) waits between the layers.
  const int64_t group_rows = std::min(plan.chunk_rows, kBackwardGroupTiles * R);
  at::parallel_for(0, plan.num_chunks, grain_for(3 * per_row_flops(pr) * plan.chunk_rows), [&](int64_t c0, int64_t c1) {
    SingleThreadedBlas single;
    // h^{t-1} and alpha of one tile, delta of the group.
    T* buf = thread_workspace<T>((2 * R + group_rows) * FD);
    T* h_prev = buf;
    T* alpha = buf + R * FD;
    T* delta_group = alpha + R * FD;
    for (int64_t c = c0; c < c1; ++c) {
      T* dw = partials + c * L * layer_big;
      const int64_t c_begin = c * plan.chunk_rows, c_end = std::min(pr.batch, (c + 1) * plan.chunk_rows);
      for (int64_t g0 = c_begin; g0 < c_end; g0 += group_rows) {
        const int64_t g1 = std::min(c_end, g0 + group_rows);
        auto tile_rows = [&](int64_t r0) {
          return BackwardTileRows<T>{int(std::min(R, g1 - r0)), F, D, L, pr.h0 + r0 * FD,
                                     pr.grad_states + r0 * (L + 1) * F,
                                     pr.grad_sum == nullptr ? nullptr : pr.grad_sum + r0 * FD, saved + r0 * L * FD,
                                     pr.grad_h0 + r0 * FD};
        };
        for (int t = L; t >= 1; --t) {
          for (int64_t r0 = g0; r0 < g1; r0 += R) {
            const BackwardTileRows<T> tr = tile_rows(r0);
            T* delta = delta_group + (r0 - g0) * FD;
            run_pass<BackwardRowsPass<T>>(D, &tr, t, static_cast<const T*>(delta), alpha, h_prev);
            kernel_weight_grad_product(pieces, t == 1 ? tr.h0 : h_prev, alpha, tr.rows, F, D,
                                       r0 == c_begin ? T(0) : T(1), dw + (t - 1) * layer_big);
            kernel_delta_product(pieces, alpha, w + (t - 1) * layer_big, tr.rows, F, D, delta);
          }
        }
        for (int64_t r0 = g0; r0 < g1; r0 += R) {
          const BackwardTileRows<T> tr = tile_rows(r0);
          run_pass<BackwardRowsPass<T>>(D, &tr, 0, static_cast<const T*>(delta_group + (r0 - g0) * FD), alpha,
                                        h_prev);
        }
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
          const T* src = partials + row + int64_t(j) * D;
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
