// Fused CPU kernels for dagfm_ext::propagate_fwd / propagate_fwd_train / propagate_bwd and the
// propagate_sum_fwd / propagate_sum_fwd_train pair (the same tiles, also summing z = h^0 + ... + h^L).
//
// Forward (every interaction): tiles of consecutive samples run through all L layers in a small
// per-thread workspace (tile.h); the register-blocked loops (vec.h) read the weights in their own
// layout, so no call spends time re-laying them out, and edges i > j are never touched. The kernel
// interaction at large batches: BLAS products over field groups of the packed weight instead.
// Backward: the same tiles for inner / outer (and kernel at small D); the kernel interaction at
// D >= 8 as BLAS products over field groups of the block-upper-triangular weight, split at the
// diagonal so that no product multiplies a block below it.
//
// Threads: a call uses as many threads as it has work for (kMinFlopsPerThread each), so a small
// batch runs on the calling thread alone; BLAS inside a parallel region runs single-threaded. The
// kernel interaction's forward at small batches is the exception: its cost is streaming megabytes
// of weights, so the threads split every layer's target fields instead (forward_kernel_columns).
// The instruction set is picked once per process (AVX-512, AVX2 or portable; the environment
// variable DAGFM_CPU_ISA=avx512|avx2|generic lowers it, e.g. to test the AVX2 loops here).
//
// Weight gradients: the batch is cut into chunks that depend only on the shapes (never on the
// thread count); each chunk sums its rows in order into its own partial, and the partials are added
// in chunk order. The same inputs therefore give bit-identical gradients for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../dagfm_math.h"
#include "../ops.h"
#include "backward_tile.h"
#include "tile.h"

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

// The tile loops are compiled three times: portable, AVX2+FMA and AVX-512; cpu_isa() picks one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DAGFM_X86_DISPATCH 1
#define DAGFM_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define DAGFM_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define DAGFM_X86_DISPATCH 0
#endif

namespace dagfm {
namespace {

// Below this embedding size the backward's tile loops beat BLAS calls on tiny (D-wide) blocks.
constexpr int kBlasMinEmbedDim = 8;
// Samples per tile: each weight loaded serves the tile's samples (in register blocks of 2 to 24)
// while the tile's states, 3 x kForwardTileRows x F*D values, stay in L2; a multiple of the 16
// lanes of the outer interaction's lane groups (no padded lanes in a whole tile).
constexpr int kForwardTileRows = 48;
constexpr int kBackwardRowTile = 32;
// Work below which a second thread costs more (wake-up, a cold cache) than it saves.
constexpr int64_t kMinFlopsPerThread = int64_t(1) << 20;
// Kernel interaction below two full tiles: the threads split the target fields of every layer
// rather than the samples, when each thread's share of a layer's weights is at least this large.
// (From two full tiles on, two threads take a tile each as fast; measured on 2 cores.)
constexpr int64_t kColumnSplitMaxBatch = 2 * kForwardTileRows - 1;
constexpr int64_t kMinColumnBytesPerThread = int64_t(128) << 10;
// Kernel interaction: from this batch size the forward runs as BLAS products on tiles of rows.
constexpr int64_t kBlasForwardMinBatch = 512;
constexpr int64_t kBlasTileRows = 64;
// Rows per backward BLAS tile: a long inner dimension for the dW products, capped by its workspace.
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
// Instruction set

enum class CpuIsa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(CpuIsa isa) {
  return isa == CpuIsa::Avx512 ? "avx512" : isa == CpuIsa::Avx2 ? "avx2" : "generic";
}

CpuIsa detect_isa() {
  CpuIsa best = CpuIsa::Generic;
#if DAGFM_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = CpuIsa::Avx512;
#endif
  // DAGFM_CPU_ISA may lower the choice (never raise it above what the CPU has).
  if (const char* env = std::getenv("DAGFM_CPU_ISA")) {
    const std::string want(env);
    const CpuIsa asked = want == "avx512" ? CpuIsa::Avx512 : want == "avx2" ? CpuIsa::Avx2 : CpuIsa::Generic;
    TORCH_CHECK(want == "avx512" || want == "avx2" || want == "generic",
                "DAGFM_CPU_ISA: expected one of 'avx512', 'avx2', 'generic', got '", want, "'");
    best = std::min(best, asked);
  }
  return best;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

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

// ---------------------------------------------------------------------------------------------
// Tile ranges, one entry per instruction set

template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void forward_range(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws, T* saved) {
  for (int64_t b = b0; b < b1; b += kForwardTileRows)
    cpu::forward_tile<T, kBytes, kRegs, kD>(pr, b, int(std::min<int64_t>(kForwardTileRows, b1 - b)), ws, saved);
}

template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void backward_range(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1, T* grad_p,
                             T* grad_q, T* ws, const T* saved) {
  T* scratch = ws + tile_workspace_numel(pr.num_fields, pr.embed_dim, pr.depth, kBackwardRowTile);
  for (int64_t b = b0; b < b1; b += kBackwardRowTile)
    cpu::backward_tile<T, kBytes, kRegs, kD>(pr, b, int(std::min<int64_t>(kBackwardRowTile, b1 - b)), grad_p,
                                             grad_q, ws, saved, scratch);
}

template <typename T, int kD>
void forward_range_generic(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws, T* saved) {
  forward_range<T, 0, 0, kD>(pr, b0, b1, ws, saved);
}
template <typename T, int kD>
void backward_range_generic(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1, T* gp, T* gq,
                            T* ws, const T* saved) {
  backward_range<T, 0, 0, kD>(pr, b0, b1, gp, gq, ws, saved);
}
#if DAGFM_X86_DISPATCH
template <typename T, int kD>
DAGFM_TARGET_AVX2 void forward_range_avx2(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws,
                                          T* saved) {
  forward_range<T, 32, 12, kD>(pr, b0, b1, ws, saved);
}
template <typename T, int kD>
DAGFM_TARGET_AVX2 void backward_range_avx2(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1,
                                           T* gp, T* gq, T* ws, const T* saved) {
  backward_range<T, 32, 12, kD>(pr, b0, b1, gp, gq, ws, saved);
}
template <typename T, int kD>
DAGFM_TARGET_AVX512 void forward_range_avx512(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws,
                                              T* saved) {
  forward_range<T, 64, 24, kD>(pr, b0, b1, ws, saved);
}
template <typename T, int kD>
DAGFM_TARGET_AVX512 void backward_range_avx512(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1,
                                               T* gp, T* gq, T* ws, const T* saved) {
  backward_range<T, 64, 24, kD>(pr, b0, b1, gp, gq, ws, saved);
}
#endif

template <typename T, int kD>
void forward_range_isa(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws, T* saved) {
#if DAGFM_X86_DISPATCH
  if (cpu_isa() == CpuIsa::Avx512) return forward_range_avx512<T, kD>(pr, b0, b1, ws, saved);
  if (cpu_isa() == CpuIsa::Avx2) return forward_range_avx2<T, kD>(pr, b0, b1, ws, saved);
#endif
  forward_range_generic<T, kD>(pr, b0, b1, ws, saved);
}

template <typename T, int kD>
void backward_range_isa(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1, T* gp, T* gq, T* ws,
                        const T* saved) {
#if DAGFM_X86_DISPATCH
  if (cpu_isa() == CpuIsa::Avx512) return backward_range_avx512<T, kD>(pr, b0, b1, gp, gq, ws, saved);
  if (cpu_isa() == CpuIsa::Avx2) return backward_range_avx2<T, kD>(pr, b0, b1, gp, gq, ws, saved);
#endif
  backward_range_generic<T, kD>(pr, b0, b1, gp, gq, ws, saved);
}

// Kernel interaction, layer t (1-based) for the target fields [j0, j1) of the whole batch: the
// next states (with layer 1, those of h0 too) and, where asked, the saved messages and the sum z of
// those fields. The states sum as in forward_tile (row_sums), so that both paths give the same bits.
template <typename T, int kBytes, int kRegs, int kD>
DAGFM_HD void kernel_columns(const PropagateParams<T>& pr, int t, const T* h_prev, T* h, int j0, int j1, T* saved) {
  const int F = pr.num_fields, L = pr.depth, S = int(pr.batch);
  const int64_t FD = int64_t(F) * kD, states_row = int64_t(L + 1) * F;
  cpu::LayerOut<T> out;
  out.h = h;
  out.a = saved == nullptr ? nullptr : saved + int64_t(t - 1) * FD;
  out.a_row = L * FD;
  out.z = pr.sum_out;
  out.z_first = t == 1;
  cpu::kernel_layer_columns<T, kBytes, kRegs, kD>(pr.p + (t - 1) * pr.layer_weight_numel(), pr.h0, h_prev, out, F,
                                                  S, j0, j1);
  constexpr int kVB = cpu::row_vector_bytes<T, kBytes, kD>();
  if constexpr (kVB > 0) {
    for (int s = 0; s < S; ++s) {
      T* row = pr.states + s * states_row + j0;
      if (t == 1) cpu::row_sums<T, kVB, kD>(pr.h0 + s * FD + int64_t(j0) * kD, j1 - j0, row);
      cpu::row_sums<T, kVB, kD>(h + s * FD + int64_t(j0) * kD, j1 - j0, row + int64_t(t) * F);
    }
  }
}

template <typename T, int kD>
void kernel_columns_generic(const PropagateParams<T>&, int, const T*, T*, int, int, T*) {
  TORCH_CHECK(false, "kernel_columns: no vector loops in this build");  // never taken: see column_split_threads
}
#if DAGFM_X86_DISPATCH
template <typename T, int kD>
DAGFM_TARGET_AVX2 void kernel_columns_avx2(const PropagateParams<T>& pr, int t, const T* h_prev, T* h, int j0,
                                           int j1, T* saved) {
  kernel_columns<T, 32, 12, kD>(pr, t, h_prev, h, j0, j1, saved);
}
template <typename T, int kD>
DAGFM_TARGET_AVX512 void kernel_columns_avx512(const PropagateParams<T>& pr, int t, const T* h_prev, T* h,
                                               int j0, int j1, T* saved) {
  kernel_columns<T, 64, 24, kD>(pr, t, h_prev, h, j0, j1, saved);
}
#endif

// Whether kernel_columns has vector loops for T and D on this CPU.
template <typename T>
bool kernel_columns_available(int D) {
  bool ok = false;
#if DAGFM_X86_DISPATCH
  with_static_embed_dim(D, [&]<int kD>() {
    if (cpu_isa() == CpuIsa::Avx512) ok = cpu::kernel_columns_vectorized<T, 64, kD>();
    else if (cpu_isa() == CpuIsa::Avx2) ok = cpu::kernel_columns_vectorized<T, 32, kD>();
  });
#endif
  return ok;
}

template <typename T, int kD>
void kernel_columns_isa(const PropagateParams<T>& pr, int t, const T* h_prev, T* h, int j0, int j1, T* saved) {
#if DAGFM_X86_DISPATCH
  if (cpu_isa() == CpuIsa::Avx512) return kernel_columns_avx512<T, kD>(pr, t, h_prev, h, j0, j1, saved);
  if (cpu_isa() == CpuIsa::Avx2) return kernel_columns_avx2<T, kD>(pr, t, h_prev, h, j0, j1, saved);
#endif
  kernel_columns_generic<T, kD>(pr, t, h_prev, h, j0, j1, saved);
}

// Buffers the tile loops read are cache-line aligned: they load whole 64-byte vectors, and one
// that straddles two lines costs two loads. A buffer holds kLineElems<T> spare elements for it.
constexpr uintptr_t kCacheLine = 64;
template <typename T>
constexpr int64_t kLineElems = int64_t(kCacheLine / sizeof(T));

template <typename T>
T* line_aligned(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + kCacheLine - 1) & ~(kCacheLine - 1));
}

// A per-thread scratch buffer that only grows: no allocation (and no page faults) per call.
template <typename T>
T* thread_workspace(int64_t numel) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < numel + kLineElems<T>) buf.resize(numel + kLineElems<T>);
  return line_aligned(buf.data());
}

// Units of `unit_flops` each per thread, so that every thread gets at least kMinFlopsPerThread.
int64_t grain_for(int64_t unit_flops) {
  return std::max<int64_t>(1, (kMinFlopsPerThread + unit_flops - 1) / std::max<int64_t>(1, unit_flops));
}

// ---------------------------------------------------------------------------------------------
// Tile path

// saved (nullable): receives the messages a^1..a^L as (B, L, F, D) for the backward.
template <typename T>
void forward_rows(const PropagateParams<T>& pr, T* saved = nullptr) {
  const int F = pr.num_fields, D = pr.embed_dim;
  const int64_t tile_rows = std::min<int64_t>(kForwardTileRows, pr.batch);
  const int64_t num_tiles = (pr.batch + tile_rows - 1) / tile_rows;
  const int64_t grain = grain_for(per_row_flops(pr) * tile_rows);
  at::parallel_for(0, num_tiles, grain, [&](int64_t tile0, int64_t tile1) {
    T* ws = thread_workspace<T>(cpu::forward_tile_numel(F, D, int(tile_rows)));
    const int64_t b0 = tile0 * tile_rows, b1 = std::min(pr.batch, tile1 * tile_rows);
    with_static_embed_dim(D, [&]<int kD>() { forward_range_isa<T, kD>(pr, b0, b1, ws, saved); });
  });
}

// Threads for the column split of the kernel interaction's forward, or 0 where it does not pay:
// a small batch reads every weight once per layer for few FMAs, so the call costs what streaming
// L * F(F+1)/2 * D^2 weights costs. Split over the target fields, each thread reads only its share
// of every layer (which stays in its core's L2 from one call to the next); the threads meet once
// per layer, since layer t reads all of h^(t-1).
template <typename T>
int column_split_threads(const PropagateParams<T>& pr) {
  if (pr.interaction != Interaction::Kernel || pr.depth == 0 || pr.batch > kColumnSplitMaxBatch ||
      at::in_parallel_region())
    return 0;
  const int64_t edges = int64_t(pr.num_fields) * (pr.num_fields + 1) / 2;
  const int64_t layer_bytes = edges * pr.embed_dim * pr.embed_dim * int64_t(sizeof(T));
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), layer_bytes / kMinColumnBytesPerThread,
                                             pr.num_fields});
  return threads >= 2 && kernel_columns_available<T>(pr.embed_dim) ? int(threads) : 0;
}

// The kernel interaction's forward with the target fields split over `threads` threads, in parts
// of about equal work (field j has j + 1 source blocks). saved as in forward_rows.
template <typename T>
void forward_kernel_columns(const PropagateParams<T>& pr, int threads, T* saved) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t BFD = pr.batch * F * int64_t(D);
  std::vector<int> bounds(threads + 1, F);
  bounds[0] = 0;
  const int64_t total = int64_t(F) * (F + 1) / 2;
  for (int k = 1, j = 0; k < threads; ++k) {
    while (j < F && int64_t(j) * (j + 1) / 2 < total * k / threads) ++j;
    bounds[k] = std::max(bounds[k - 1], j);
  }
  T* ws = thread_workspace<T>(2 * BFD);
  T* hbuf[2] = {ws, ws + BFD};
  const T* h_prev = pr.h0;
  for (int t = 1; t <= L; ++t) {
    T* h = hbuf[t & 1];
    at::parallel_for(0, threads, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        if (bounds[k] < bounds[k + 1])
          with_static_embed_dim(D, [&]<int kD>() {
            kernel_columns_isa<T, kD>(pr, t, h_prev, h, bounds[k], bounds[k + 1], saved);
          });
    });
    h_prev = h;
  }
}

template <typename T>
void backward_rows(const PropagateBackwardParams<T>& pr, const T* saved = nullptr) {
  const int F = pr.num_fields, D = pr.embed_dim, L = pr.depth;
  const int64_t wnum = pr.weight_numel();
  const int64_t qnum = pr.q != nullptr ? wnum : 0;
  const ChunkPlan plan = plan_gradient_chunks(pr.batch, (wnum + qnum) * int64_t(sizeof(T)));
  // One chunk accumulates straight into the (zeroed) outputs.
  const bool direct = plan.num_chunks == 1;
  std::vector<T> partial_p_buf, partial_q_buf;
  T* partial_p = nullptr;
  T* partial_q = nullptr;
  if (!direct) {
    partial_p_buf.assign(plan.num_chunks * wnum + kLineElems<T>, T(0));
    partial_q_buf.assign(plan.num_chunks * qnum + kLineElems<T>, T(0));
    partial_p = line_aligned(partial_p_buf.data());
    partial_q = line_aligned(partial_q_buf.data());
  }
  const int64_t grain = grain_for(3 * per_row_flops(pr) * plan.chunk_rows);
  at::parallel_for(0, plan.num_chunks, grain, [&](int64_t c0, int64_t c1) {
    T* ws = thread_workspace<T>(tile_workspace_numel(F, D, L, kBackwardRowTile) + cpu::outer_lanes_scratch_numel(F, D));
    for (int64_t c = c0; c < c1; ++c) {
      T* gp = direct ? pr.grad_p : partial_p + c * wnum;
      T* gq = qnum == 0 ? nullptr : direct ? pr.grad_q : partial_q + c * qnum;
      const int64_t b0 = c * plan.chunk_rows, b1 = std::min(pr.batch, b0 + plan.chunk_rows);
      with_static_embed_dim(D, [&]<int kD>() { backward_range_isa<T, kD>(pr, b0, b1, gp, gq, ws, saved); });
    }
  });
  if (!direct) {
    reduce_partials(partial_p, plan.num_chunks, wnum, pr.grad_p);
    if (qnum) reduce_partials(partial_q, plan.num_chunks, qnum, pr.grad_q);
  }
}

// ---------------------------------------------------------------------------------------------
// BLAS backward for the kernel interaction

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
int fields_per_group(int D) { return std::max(1, 64 / D); }

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

// The forward takes BLAS only where packing the weights is small next to the products.
template <typename T>
void forward(const PropagateParams<T>& pr, T* saved = nullptr) {
  if (use_kernel_blas(pr) && pr.batch >= kBlasForwardMinBatch)
    forward_kernel_blas(pr, saved);
  else if (const int threads = column_split_threads(pr))
    forward_kernel_columns(pr, threads, saved);
  else
    forward_rows(pr, saved);
}

// ---------------------------------------------------------------------------------------------
// Op implementations

at::Tensor propagate_fwd_cpu(const at::Tensor& h0, const at::Tensor& p,
                             const std::optional<at::Tensor>& q, c10::string_view interaction) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  at::Tensor states = empty_states(args);
  if (args.batch == 0) return states;
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_fwd_cpu", [&] {
    forward(make_params<scalar_t>(args, states));
  });
  return states;
}

// The training forward keeps the messages a^1..a^L, laid out (B, L, F, D): re-deriving them in the
// backward costs another forward, while reading them back is one pass over B*L*F*D values.
std::tuple<at::Tensor, at::Tensor> propagate_fwd_train_cpu(const at::Tensor& h0, const at::Tensor& p,
                                                           const std::optional<at::Tensor>& q,
                                                           c10::string_view interaction) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  at::Tensor states = empty_states(args);
  // Flat (B*L*F*D,): a 1-D buffer keeps its layout through torch.compile's graph partitioning.
  at::Tensor saved = at::empty({args.batch * args.depth * args.num_fields * args.embed_dim}, args.h0.options());
  if (args.batch == 0) return {states, saved};
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_fwd_train_cpu", [&] {
    forward(make_params<scalar_t>(args, states), saved.data_ptr<scalar_t>());
  });
  return {states, saved};
}

// The propagation with the D-vector sum z = h^0 + ... + h^L (B, F, D) accumulated in the tiles:
// (states, z) for inference, plus the kept messages for training.
std::tuple<at::Tensor, at::Tensor> propagate_sum_fwd_cpu(const at::Tensor& h0, const at::Tensor& p,
                                                         const std::optional<at::Tensor>& q,
                                                         c10::string_view interaction) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  at::Tensor states = empty_states(args);
  at::Tensor z = at::empty_like(args.h0);
  if (args.batch == 0) return {states, z};
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_sum_fwd_cpu", [&] {
    auto params = make_params<scalar_t>(args, states);
    params.sum_out = z.data_ptr<scalar_t>();
    forward(params);
  });
  return {states, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_sum_fwd_train_cpu(const at::Tensor& h0, const at::Tensor& p,
                                                                           const std::optional<at::Tensor>& q,
                                                                           c10::string_view interaction) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  at::Tensor states = empty_states(args);
  at::Tensor z = at::empty_like(args.h0);
  at::Tensor saved = at::empty({args.batch * args.depth * args.num_fields * args.embed_dim}, args.h0.options());
  if (args.batch == 0) return {states, z, saved};
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_sum_fwd_train_cpu", [&] {
    auto params = make_params<scalar_t>(args, states);
    params.sum_out = z.data_ptr<scalar_t>();
    forward(params, saved.data_ptr<scalar_t>());
  });
  return {states, z, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_bwd_cpu(
    const at::Tensor& grad_states, const at::Tensor& h0, const at::Tensor& p,
    const std::optional<at::Tensor>& q, c10::string_view interaction,
    const std::optional<at::Tensor>& saved_in, const std::optional<at::Tensor>& grad_sum_in) {
  const PropagateArgs args = check_propagate_args(h0, p, q, std::string_view(interaction.data(), interaction.size()));
  const at::Tensor gs = check_grad_states(grad_states, args);
  at::Tensor saved = check_saved_messages(saved_in, args);
  const at::Tensor grad_sum = check_grad_sum(grad_sum_in, args);
  at::Tensor grad_h0 = at::empty_like(args.h0);
  at::Tensor grad_p = at::zeros_like(args.p);
  at::Tensor grad_q = args.q.defined() ? at::zeros_like(args.q) : at::empty({0}, args.p.options());
  if (args.batch == 0) return {grad_h0, grad_p, grad_q};
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_bwd_cpu", [&] {
    auto params = make_backward_params<scalar_t>(args, gs, grad_h0, grad_p, grad_q);
    if (grad_sum.defined()) params.grad_sum = grad_sum.data_ptr<scalar_t>();
    if (use_kernel_blas(params)) {
      // The BLAS backward reads the messages; without them, one forward recomputes them all.
      if (!saved.defined()) {
        at::Tensor no_states = empty_states(args);
        saved = at::empty({args.batch * args.depth * args.num_fields * int64_t(args.embed_dim)}, args.h0.options());
        forward(make_params<scalar_t>(args, no_states), saved.data_ptr<scalar_t>());
      }
      backward_kernel_blas(params, saved.data_ptr<scalar_t>());
    } else {
      backward_rows(params, saved.defined() ? saved.data_ptr<scalar_t>() : nullptr);
    }
  });
  return {grad_h0, grad_p, grad_q};
}

}  // namespace
}  // namespace dagfm

// The instruction set the CPU loops run with in this process, for tests and benchmark reports.
TORCH_LIBRARY_FRAGMENT(dagfm_ext, m) {
  m.def("cpu_isa() -> str", [] { return std::string(dagfm::isa_name(dagfm::cpu_isa())); });
}

TORCH_LIBRARY_IMPL(dagfm_ext, CPU, m) {
  m.impl("propagate_fwd", &dagfm::propagate_fwd_cpu);
  m.impl("propagate_fwd_train", &dagfm::propagate_fwd_train_cpu);
  m.impl("propagate_bwd", &dagfm::propagate_bwd_cpu);
  m.impl("propagate_sum_fwd", &dagfm::propagate_sum_fwd_cpu);
  m.impl("propagate_sum_fwd_train", &dagfm::propagate_sum_fwd_train_cpu);
}
