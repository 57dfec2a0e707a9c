// Fused CPU kernels for dagfm_ext::propagate_fwd / propagate_bwd.
//
// inner / outer (and kernel at small D): one pass per batch row over all L layers, the row's states
// kept in a small per-thread workspace (dagfm_math.h), the batch split over threads.
// kernel at D >= 8: the layer is a block-upper-triangular matrix product, done as BLAS products
// over column groups of the masked (F*D x F*D) weight on tiles of rows, so the lower triangle is
// (almost) never multiplied and a tile's states stay in cache across the layers.
//
// Weight gradients: the batch is cut into chunks that depend only on the shapes (never on the
// thread count); each chunk sums its rows in order into its own partial, and the partials are added
// in chunk order. The same inputs therefore give bit-identical gradients for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../dagfm_math.h"
#include "../ops.h"

// Fortran BLAS as exported by the BLAS that torch links (MKL on x86 wheels). Declared weak so a
// torch without them still loads; the portable loops below take over then.
#if defined(__GNUC__) && !defined(_WIN32)
#define DAGFM_WEAK __attribute__((weak))
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) DAGFM_WEAK;
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) DAGFM_WEAK;
// Fortran entry point (argument by reference), the one MKL exports under the plain name too.
int mkl_set_num_threads_local_(const int* nt) DAGFM_WEAK;
}
#define DAGFM_HAVE_WEAK_BLAS 1
#else
#define DAGFM_HAVE_WEAK_BLAS 0
#endif

// The per-row loops are compiled for the baseline ISA and for AVX2+FMA / AVX-512; the loader
// picks the best the machine has (ifunc), so one binary runs anywhere and fast where it can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DAGFM_ISA_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define DAGFM_ISA_CLONES
#endif

namespace dagfm {
namespace {

// Below this embedding size the per-row loops beat BLAS calls on tiny (D-wide) blocks.
constexpr int kBlasMinEmbedDim = 8;
// Rows per tile of the per-row path: each weight loaded from cache serves this many rows.
constexpr int kRowTile = 8;
// Rows per forward BLAS tile: its three kTileRows x F*D buffers stay in L2. The backward takes
// longer tiles (a longer inner dimension for the dW products), capped by its workspace size.
constexpr int64_t kTileRows = 64;
constexpr int64_t kBackwardTileRows = 256;
constexpr int64_t kBackwardWorkspaceBytes = int64_t(8) << 20;
// Gradient chunks: at least this many rows each, at most this many chunks, within this memory.
// Partials are zeroed and summed once more at the end, so their total stays small next to the work.
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMaxPartialBytes = int64_t(32) << 20;

// ---------------------------------------------------------------------------------------------
// BLAS glue

template <typename T>
bool blas_available() {
#if DAGFM_HAVE_WEAK_BLAS
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  if constexpr (std::is_same_v<T, double>) return dgemm_ != nullptr;
#endif
  return false;
}

// A BLAS call inside a tile must run on one thread: the tiles are already spread over the threads,
// and a single-threaded product sums in the same order whatever the thread count.
struct SingleThreadedBlas {
  SingleThreadedBlas() {
#if DAGFM_HAVE_WEAK_BLAS
    const int one = 1;
    if (mkl_set_num_threads_local_ != nullptr) previous_ = mkl_set_num_threads_local_(&one);
#endif
  }
  ~SingleThreadedBlas() {
#if DAGFM_HAVE_WEAK_BLAS
    if (mkl_set_num_threads_local_ != nullptr) mkl_set_num_threads_local_(&previous_);
#endif
  }
  int previous_ = 0;
};

// Row-major C (M x N) = op(A) * op(B) + beta * C; op(A) is M x K, op(B) is K x N.
template <typename T>
void gemm_rowmajor(bool trans_a, bool trans_b, int M, int N, int K, const T* A, int lda,
                   const T* B, int ldb, T beta, T* C, int ldc) {
  if (M == 0 || N == 0) return;
#if DAGFM_HAVE_WEAK_BLAS
  if (blas_available<T>()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N';
    const char tb = trans_a ? 'T' : 'N';
    const T one = T(1);
    if constexpr (std::is_same_v<T, float>)
      sgemm_(&ta, &tb, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
    else
      dgemm_(&ta, &tb, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
#endif
  for (int m = 0; m < M; ++m) {
    T* c = C + int64_t(m) * ldc;
    if (beta == T(0))
      std::fill(c, c + N, T(0));
    else if (beta != T(1))
      for (int n = 0; n < N; ++n) c[n] *= beta;
    for (int k = 0; k < K; ++k) {
      const T a = trans_a ? A[int64_t(k) * lda + m] : A[int64_t(m) * lda + k];
      if (trans_b) {
        for (int n = 0; n < N; ++n) c[n] += a * B[int64_t(n) * ldb + k];
      } else {
        const T* b = B + int64_t(k) * ldb;
        DAGFM_SIMD
        for (int n = 0; n < N; ++n) c[n] += a * b[n];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Work split

struct ChunkPlan {
  int64_t num_chunks = 1;
  int64_t chunk_rows = 1;
};

// Depends on the batch size and the weight size only, never on the thread count.
ChunkPlan plan_gradient_chunks(int64_t batch, int64_t partial_bytes) {
  ChunkPlan plan;
  const int64_t by_rows = (batch + kMinChunkRows - 1) / kMinChunkRows;
  const int64_t by_memory = std::max<int64_t>(1, kMaxPartialBytes / std::max<int64_t>(1, partial_bytes));
  plan.num_chunks = std::max<int64_t>(1, std::min({by_rows, kMaxChunks, by_memory}));
  plan.chunk_rows = (batch + plan.num_chunks - 1) / plan.num_chunks;
  plan.num_chunks = (batch + plan.chunk_rows - 1) / plan.chunk_rows;
  return plan;
}

// out[k] = sum_c partials[c][k], c in order; threads split k only.
template <typename T>
void reduce_partials(const T* partials, int64_t num_chunks, int64_t numel, T* out) {
  at::parallel_for(0, numel, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) out[k] = partials[k];
    for (int64_t c = 1; c < num_chunks; ++c) {
      const T* part = partials + c * numel;
      DAGFM_SIMD
      for (int64_t k = k0; k < k1; ++k) out[k] += part[k];
    }
  });
}

template <typename T>
int64_t per_row_flops(const PropagateParams<T>& pr) {
  const int64_t edges = int64_t(pr.num_fields) * (pr.num_fields + 1) / 2;
  const int64_t per_edge = pr.interaction == Interaction::Kernel ? 2 * int64_t(pr.embed_dim) * pr.embed_dim
                           : pr.interaction == Interaction::Outer ? 4 * int64_t(pr.embed_dim)
                                                                  : 2 * int64_t(pr.embed_dim);
  return std::max<int64_t>(1, edges * per_edge * pr.depth);
}

// ---------------------------------------------------------------------------------------------
// Per-row path (all interactions)

// Calls f.template operator()<kD>() with D fixed at compile time for the common embedding sizes.
template <typename Fn>
void with_static_embed_dim(int D, Fn&& f) {
  switch (D) {
    case 4: f.template operator()<4>(); break;
    case 8: f.template operator()<8>(); break;
    case 16: f.template operator()<16>(); break;
    case 32: f.template operator()<32>(); break;
    default: f.template operator()<0>(); break;
  }
}

template <typename T, int kD>
DAGFM_ISA_CLONES void forward_tile(const PropagateParams<T>& pr, int64_t b, int rows, T* ws,
                                   T* saved) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  tile_forward<T, T, kD>(pr.interaction, pr.h0 + b * F * D, pr.p, pr.q,
                         pr.states + b * (L + 1) * F, ws, F, D, L, rows,
                         saved == nullptr ? saved : saved + b * L * F * D);
}

template <typename T, int kD>
DAGFM_ISA_CLONES void backward_tile(const PropagateBackwardParams<T>& pr, int64_t b, int rows,
                                    T* grad_p, T* grad_q, T* ws, const T* saved) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  tile_backward<T, T, kD>(pr.interaction, pr.h0 + b * F * D, pr.p, pr.q,
                          pr.grad_states + b * (L + 1) * F, pr.grad_h0 + b * F * D, grad_p, grad_q,
                          ws, F, D, L, rows, saved == nullptr ? saved : saved + b * L * F * D,
                          pr.grad_sum == nullptr ? pr.grad_sum : pr.grad_sum + b * F * D);
}

template <typename T>
void forward_rows(const PropagateParams<T>& pr, T* saved = nullptr) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t num_tiles = (pr.batch + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (per_row_flops(pr) * kRowTile));
  at::parallel_for(0, num_tiles, grain, [&](int64_t tile0, int64_t tile1) {
    std::vector<T> ws(tile_workspace_numel(F, D, L, kRowTile));
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t b = tile * kRowTile;
      const int rows = int(std::min<int64_t>(kRowTile, pr.batch - b));
      with_static_embed_dim(D, [&]<int kD>() { forward_tile<T, kD>(pr, b, rows, ws.data(), saved); });
    }
  });
}

template <typename T>
void backward_rows(const PropagateBackwardParams<T>& pr, const T* saved = nullptr) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t wnum = pr.weight_numel();
  const int64_t qnum = pr.q != nullptr ? wnum : 0;
  const ChunkPlan plan = plan_gradient_chunks(pr.batch, (wnum + qnum) * int64_t(sizeof(T)));
  // One chunk accumulates straight into the (zeroed) outputs.
  const bool direct = plan.num_chunks == 1;
  std::vector<T> partial_p, partial_q;
  if (!direct) {
    partial_p.assign(plan.num_chunks * wnum, T(0));
    partial_q.assign(plan.num_chunks * qnum, T(0));
  }
  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> ws(tile_workspace_numel(F, D, L, kRowTile));
    for (int64_t c = c0; c < c1; ++c) {
      T* gp = direct ? pr.grad_p : partial_p.data() + c * wnum;
      T* gq = qnum == 0 ? nullptr : direct ? pr.grad_q : partial_q.data() + c * qnum;
      const int64_t b_end = std::min(pr.batch, (c + 1) * plan.chunk_rows);
      for (int64_t b = c * plan.chunk_rows; b < b_end; b += kRowTile) {
        const int rows = int(std::min<int64_t>(kRowTile, b_end - b));
        with_static_embed_dim(D, [&]<int kD>() { backward_tile<T, kD>(pr, b, rows, gp, gq, ws.data(), saved); });
      }
    }
  });
  if (!direct) {
    reduce_partials(partial_p.data(), plan.num_chunks, wnum, pr.grad_p);
    if (qnum) reduce_partials(partial_q.data(), plan.num_chunks, qnum, pr.grad_q);
  }
}

// ---------------------------------------------------------------------------------------------
// BLAS path for the kernel interaction

// Masked dense weight per layer: rows (i, d), columns (j, e), block (i, j) = W[i, j] for i <= j.
template <typename T>
std::vector<T> pack_block_triangular(const T* w, int F, int D, int L) {
  const int64_t FD = int64_t(F) * D;
  std::vector<T> big(int64_t(L) * FD * FD);
  at::parallel_for(0, int64_t(L) * F, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / F;
      const int i = int(r % F);
      for (int d = 0; d < D; ++d) {
        T* row = big.data() + t * FD * FD + (int64_t(i) * D + d) * FD;
        std::fill(row, row + int64_t(i) * D, T(0));
        for (int j = i; j < F; ++j) {
          const T* src = w + ((t * F + i) * F + j) * int64_t(D) * D + int64_t(d) * D;
          std::copy(src, src + D, row + int64_t(j) * D);
        }
      }
    }
  });
  return big;
}

// Field groups per BLAS call: wide enough for an efficient product, narrow enough that the
// zero blocks multiplied next to the diagonal stay a small share of the work.
int fields_per_group(int D) { return std::max(1, 64 / D); }

template <typename T>
void write_states(const T* h, int64_t rows, int F, int D, T* states, int64_t state_row_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < F; ++j)
      states[r * state_row_stride + j] = sum(h + (r * F + j) * D, D);
}

// a (rows x FD) = h_prev (rows x FD) @ W (block upper triangular), by column groups.
template <typename T>
void kernel_layer_product(const T* h_prev, const T* w, int rows, int F, int D, T* a) {
  const int FD = F * D, G = fields_per_group(D);
  for (int g0 = 0; g0 < F; g0 += G) {
    const int g1 = std::min(F, g0 + G);
    gemm_rowmajor<T>(false, false, rows, (g1 - g0) * D, g1 * D, h_prev, FD, w + g0 * D, FD, T(0),
                     a + g0 * D, FD);
  }
}

template <typename T>
void hadamard(const T* x, const T* y, int64_t n, T* out) {
  DAGFM_SIMD
  for (int64_t k = 0; k < n; ++k) out[k] = x[k] * y[k];
}

// saved (nullable): receives the messages a^1..a^L as (B, L, F, D) for the backward.
template <typename T>
void forward_kernel_blas(const PropagateParams<T>& pr, T* saved = nullptr) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D;
  const std::vector<T> w = pack_block_triangular(pr.p, F, D, L);
  const int64_t num_tiles = (pr.batch + kTileRows - 1) / kTileRows;
  at::parallel_for(0, num_tiles, 1, [&](int64_t tile0, int64_t tile1) {
    SingleThreadedBlas single;
    std::vector<T> buf(3 * kTileRows * FD);
    T* hb[2] = {buf.data(), buf.data() + kTileRows * FD};
    T* a = buf.data() + 2 * kTileRows * FD;
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kTileRows;
      const int rows = int(std::min(kTileRows, pr.batch - r0));
      const T* h0 = pr.h0 + r0 * FD;
      T* states = pr.states + r0 * (L + 1) * F;
      write_states(h0, rows, F, D, states, int64_t(L + 1) * F);
      const T* h_prev = h0;
      for (int t = 1; t <= L; ++t) {
        T* h = hb[t & 1];
        kernel_layer_product(h_prev, w.data() + (t - 1) * FD * FD, rows, F, D, a);
        hadamard(h0, a, rows * FD, h);
        if (saved != nullptr)
          for (int r = 0; r < rows; ++r)
            std::copy(a + r * FD, a + (r + 1) * FD, saved + ((r0 + r) * L + (t - 1)) * FD);
        write_states(h, rows, F, D, states + int64_t(t) * F, int64_t(L + 1) * F);
        h_prev = h;
      }
    }
  });
}

// saved (nullable): the forward's messages (B, L, F, D); without them the tile recomputes them.
template <typename T>
void backward_kernel_blas(const PropagateBackwardParams<T>& pr, const T* saved = nullptr) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t FD = int64_t(F) * D;
  const int64_t layer_big = FD * FD;
  const std::vector<T> w = pack_block_triangular(pr.p, F, D, L);
  const ChunkPlan plan = plan_gradient_chunks(pr.batch, L * layer_big * int64_t(sizeof(T)));
  std::vector<T> partials(plan.num_chunks * L * layer_big, T(0));
  const int G = fields_per_group(D);

  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    SingleThreadedBlas single;
    // Larger tiles give the dW products a longer inner dimension; cap the workspace per thread.
    const int64_t R = std::clamp<int64_t>(kBackwardWorkspaceBytes / ((2 * L + 4) * FD * int64_t(sizeof(T))),
                                          8, kBackwardTileRows);
    // h^0..h^L, a^1..a^L, delta, delta_prev, alpha, each R x FD.
    std::vector<T> buf((2 * L + 4) * R * FD);
    auto H = [&](int t) { return buf.data() + t * R * FD; };
    auto A = [&](int t) { return buf.data() + (L + t) * R * FD; };
    T* delta = buf.data() + (2 * L + 1) * R * FD;
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
        std::copy(h0, h0 + n, H(0));
        for (int t = 1; t <= L; ++t) {
          if (saved != nullptr) {
            for (int r = 0; r < rows; ++r) {
              const T* src = saved + ((r0 + r) * L + (t - 1)) * FD;
              std::copy(src, src + FD, A(t) + r * FD);
            }
          } else {
            kernel_layer_product(H(t - 1), w.data() + (t - 1) * layer_big, rows, F, D, A(t));
          }
          hadamard(h0, A(t), n, H(t));
        }
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
          const T* wt = w.data() + (t - 1) * layer_big;
          T* dwt = dw + (t - 1) * layer_big;
          const T* at_ = A(t);
          DAGFM_SIMD
          for (int64_t k = 0; k < n; ++k) {
            alpha[k] = delta[k] * h0[k];
            gh0[k] += delta[k] * at_[k];
          }
          // dW[:, group] += h^{t-1}[:, rows that reach the group]^T @ alpha[:, group]
          for (int g0 = 0; g0 < F; g0 += G) {
            const int g1 = std::min(F, g0 + G);
            gemm_rowmajor<T>(true, false, g1 * D, (g1 - g0) * D, rows, H(t - 1), int(FD),
                             alpha + g0 * D, int(FD), T(1), dwt + g0 * D, int(FD));
          }
          // delta^{t-1}[:, group] = G[t-1] + alpha[:, j >= group] @ W[group, j >= group]^T
          broadcast_grad(t - 1, delta_prev);
          for (int i0 = 0; i0 < F; i0 += G) {
            const int i1 = std::min(F, i0 + G);
            gemm_rowmajor<T>(false, true, rows, (i1 - i0) * D, (F - i0) * D, alpha + i0 * D, int(FD),
                             wt + int64_t(i0) * D * FD + i0 * D, int(FD), T(1), delta_prev + i0 * D,
                             int(FD));
          }
          std::swap(delta, delta_prev);
        }
        DAGFM_SIMD
        for (int64_t k = 0; k < n; ++k) gh0[k] += delta[k];
      }
    }
  });

  // Sum the chunk partials in order and unpack the upper blocks; the lower triangle stays zero.
  at::parallel_for(0, int64_t(L) * F, 1, [&](int64_t r0, int64_t r1) {
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

// ---------------------------------------------------------------------------------------------
// Op implementations

at::Tensor propagate_fwd_cpu(const at::Tensor& h0, const at::Tensor& p,
                             const std::optional<at::Tensor>& q, c10::string_view interaction) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  at::Tensor states = empty_states(args);
  if (args.batch == 0) return states;
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_fwd_cpu", [&] {
    const auto params = make_params<scalar_t>(args, states);
    if (use_kernel_blas(params))
      forward_kernel_blas(params);
    else
      forward_rows(params);
  });
  return states;
}

// The training forward keeps the messages a^1..a^L, laid out (B, L, F, D): re-deriving them in the
// backward costs another forward (for the kernel interaction a whole block-triangular product
// per layer), while reading them back is one pass over B*L*F*D values. Measured on the CPU at
// F=39, D=16, L=3 (benchmarks/RESULTS.md): kernel fwd+bwd went from 1.2x to 1.55x of eager.
std::tuple<at::Tensor, at::Tensor> propagate_fwd_train_cpu(const at::Tensor& h0, const at::Tensor& p,
                                                           const std::optional<at::Tensor>& q,
                                                           c10::string_view interaction) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  at::Tensor states = empty_states(args);
  // Flat (B*L*F*D,): a 1-D buffer keeps its layout through torch.compile's graph partitioning.
  at::Tensor saved = at::empty({args.batch * args.depth * args.num_fields * args.embed_dim}, args.h0.options());
  if (args.batch == 0) return {states, saved};
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_fwd_train_cpu", [&] {
    const auto params = make_params<scalar_t>(args, states);
    if (args.interaction == Interaction::Kernel)
      forward_kernel_blas(params, saved.data_ptr<scalar_t>());
    else
      forward_rows(params, saved.data_ptr<scalar_t>());
  });
  return {states, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_bwd_cpu(
    const at::Tensor& grad_states, const at::Tensor& h0, const at::Tensor& p,
    const std::optional<at::Tensor>& q, c10::string_view interaction,
    const std::optional<at::Tensor>& saved_in, const std::optional<at::Tensor>& grad_sum_in) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  const at::Tensor gs = check_grad_states(grad_states, args);
  const at::Tensor saved = check_saved_messages(saved_in, args);
  const at::Tensor grad_sum = check_grad_sum(grad_sum_in, args);
  at::Tensor grad_h0 = at::empty_like(args.h0);
  at::Tensor grad_p = at::zeros_like(args.p);
  at::Tensor grad_q = args.q.defined() ? at::zeros_like(args.q) : at::empty({0}, args.p.options());
  if (args.batch == 0) return {grad_h0, grad_p, grad_q};
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_bwd_cpu", [&] {
    auto params = make_backward_params<scalar_t>(args, gs, grad_h0, grad_p, grad_q);
    if (grad_sum.defined()) params.grad_sum = grad_sum.data_ptr<scalar_t>();
    const scalar_t* kept = saved.defined() ? saved.data_ptr<scalar_t>() : nullptr;
    if (params.interaction == Interaction::Kernel && (kept != nullptr || use_kernel_blas(params)))
      backward_kernel_blas(params, kept);
    else
      backward_rows(params, kept);
  });
  return {grad_h0, grad_p, grad_q};
}

}  // namespace
}  // namespace dagfm

TORCH_LIBRARY_IMPL(dagfm_ext, CPU, m) {
  m.impl("propagate_fwd", &dagfm::propagate_fwd_cpu);
  m.impl("propagate_fwd_train", &dagfm::propagate_fwd_train_cpu);
  m.impl("propagate_bwd", &dagfm::propagate_bwd_cpu);
}
