// Fused CPU kernels for dagfm_ext::propagate_fwd / propagate_fwd_train / propagate_bwd and the
// propagate_sum_fwd / propagate_sum_fwd_train pair (the same tiles, also summing z = h^0 + ... + h^L).
//
// Forward (every interaction): tiles of consecutive samples run through all L layers in a small
// per-thread workspace (tile.h); the register-blocked loops (forward_blocks.h) read the weights in their own
// layout, so no call spends time re-laying them out, and edges i > j are never touched. The kernel
// interaction at large batches: BLAS products over rectangles of the packed weight instead
// (kernel_blas.h). Backward: the same tiles for inner / outer (backward_tile.h; kernel at small D);
// the kernel interaction at D >= 8 and B >= 4 as BLAS products (kernel_blas.h).
//
// Threads: a call uses as many threads as it has work for (kMinFlopsPerThread each), so a small
// batch runs on the calling thread alone; BLAS inside a parallel region runs single-threaded. The
// kernel interaction's forward at small batches is the exception: its cost is streaming megabytes
// of weights, so the threads split every layer's target fields instead (forward_kernel_columns).
// The instruction set is picked once per process (isa.h: AVX-512, AVX2 or portable; the environment
// variable DAGFM_CPU_ISA=avx512|avx2|generic lowers it, e.g. to test the AVX2 loops here).
//
// Weight gradients (work_split.h): the batch is cut into chunks that depend only on the shapes
// (never on the thread count); each chunk sums its rows in order into its own partial, and the
// partials are added in chunk order. The same inputs therefore give bit-identical gradients for any thread count.
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
#include "isa.h"
#include "buffer_pool.h"
#include "kernel_blas.h"
#include "tile.h"
#include "work_split.h"

namespace dagfm {
namespace {

using cpu::kForwardTileRows;
// Kernel interaction below two full tiles: the threads split the target fields of every layer
// rather than the samples, when each thread's share of a layer's weights is at least this large.
// (From two full tiles on, two threads take a tile each as fast; measured on 2 cores.)
constexpr int64_t kColumnSplitMaxBatch = 2 * kForwardTileRows - 1;
constexpr int64_t kMinColumnBytesPerThread = int64_t(128) << 10;

// The states (B, L+1, F) of a CPU call, from the buffer pool as the op's other outputs.
at::Tensor pooled_states(const PropagateArgs& args) {
  return pooled_empty(states_sizes(args), args.h0.options());
}

// ---------------------------------------------------------------------------------------------
// Tile ranges, one entry per instruction set

template <typename T, int kD>
void forward_range_generic(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws, T* saved) {
  cpu::forward_tiles<T, 0, 0, kD>(pr, b0, b1, ws, saved);
}
template <typename T, int kD>
void backward_range_generic(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1, T* gp, T* gq,
                            T* ws, const T* saved) {
  cpu::backward_tiles<T, 0, 0, kD>(pr, b0, b1, gp, gq, ws, saved);
}
#if DAGFM_X86_DISPATCH
template <typename T, int kD>
DAGFM_TARGET_AVX2 void forward_range_avx2(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws,
                                          T* saved) {
  cpu::forward_tiles<T, 32, 12, kD>(pr, b0, b1, ws, saved);
}
template <typename T, int kD>
DAGFM_TARGET_AVX2 void backward_range_avx2(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1,
                                           T* gp, T* gq, T* ws, const T* saved) {
  cpu::backward_tiles<T, 32, 12, kD>(pr, b0, b1, gp, gq, ws, saved);
}
template <typename T, int kD>
DAGFM_TARGET_AVX512 void forward_range_avx512(const PropagateParams<T>& pr, int64_t b0, int64_t b1, T* ws,
                                              T* saved) {
  cpu::forward_tiles<T, 64, 24, kD>(pr, b0, b1, ws, saved);
}
template <typename T, int kD>
DAGFM_TARGET_AVX512 void backward_range_avx512(const PropagateBackwardParams<T>& pr, int64_t b0, int64_t b1,
                                               T* gp, T* gq, T* ws, const T* saved) {
  cpu::backward_tiles<T, 64, 24, kD>(pr, b0, b1, gp, gq, ws, saved);
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
  // The first chunk accumulates straight into the (zeroed) outputs, every other into its partial.
  // The partials live in the calling thread's buffer kept between calls (no allocation or page
  // faults per call), each zeroed by the thread that fills it, while it is in that thread's cache.
  const int64_t extra = plan.num_chunks - 1;
  T* partial_p = extra == 0 ? nullptr : thread_workspace<T, GradientPartialsBuffer>(extra * (wnum + qnum));
  T* partial_q = extra == 0 ? nullptr : partial_p + extra * wnum;
  const int64_t grain = grain_for(3 * per_row_flops(pr) * plan.chunk_rows);
  at::parallel_for(0, plan.num_chunks, grain, [&](int64_t c0, int64_t c1) {
    T* ws = thread_workspace<T>(cpu::backward_tiles_numel(F, D, L));
    for (int64_t c = c0; c < c1; ++c) {
      T* gp = c == 0 ? pr.grad_p : partial_p + (c - 1) * wnum;
      T* gq = qnum == 0 ? nullptr : c == 0 ? pr.grad_q : partial_q + (c - 1) * qnum;
      if (c > 0) {
        std::fill_n(gp, wnum, T(0));
        if (gq != nullptr) std::fill_n(gq, qnum, T(0));
      }
      const int64_t b0 = c * plan.chunk_rows, b1 = std::min(pr.batch, b0 + plan.chunk_rows);
      with_static_embed_dim(D, [&]<int kD>() { backward_range_isa<T, kD>(pr, b0, b1, gp, gq, ws, saved); });
    }
  });
  if (extra > 0) {
    add_partials(partial_p, extra, wnum, pr.grad_p);
    if (qnum) add_partials(partial_q, extra, qnum, pr.grad_q);
  }
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
  at::Tensor states = pooled_states(args);
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
  at::Tensor states = pooled_states(args);
  // Flat (B*L*F*D,): a 1-D buffer keeps its layout through torch.compile's graph partitioning.
  at::Tensor saved = pooled_empty({args.batch * args.depth * args.num_fields * args.embed_dim}, args.h0.options());
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
  at::Tensor states = pooled_states(args);
  at::Tensor z = pooled_empty(args.h0.sizes(), args.h0.options());
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
  at::Tensor states = pooled_states(args);
  at::Tensor z = pooled_empty(args.h0.sizes(), args.h0.options());
  at::Tensor saved = pooled_empty({args.batch * args.depth * args.num_fields * args.embed_dim}, args.h0.options());
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
  at::Tensor grad_h0 = pooled_empty(args.h0.sizes(), args.h0.options());
  // Zeroed below except where the BLAS path writes every element of it.
  at::Tensor grad_p = pooled_empty(args.p.sizes(), args.p.options());
  at::Tensor grad_q =
      args.q.defined() ? pooled_empty(args.q.sizes(), args.q.options()).zero_() : at::empty({0}, args.p.options());
  if (args.batch == 0) return {grad_h0, grad_p.zero_(), grad_q};
  AT_DISPATCH_FLOATING_TYPES(args.h0.scalar_type(), "propagate_bwd_cpu", [&] {
    auto params = make_backward_params<scalar_t>(args, gs, grad_h0, grad_p, grad_q);
    if (grad_sum.defined()) params.grad_sum = grad_sum.data_ptr<scalar_t>();
    if (use_kernel_blas(params) && args.batch >= kBlasBackwardMinBatch) {
      // The BLAS backward reads the messages; without them, one forward recomputes them all.
      if (!saved.defined()) {
        at::Tensor no_states = pooled_states(args);
        saved = pooled_empty({args.batch * args.depth * args.num_fields * int64_t(args.embed_dim)}, args.h0.options());
        forward(make_params<scalar_t>(args, no_states), saved.data_ptr<scalar_t>());
      }
      backward_kernel_blas(params, saved.data_ptr<scalar_t>());
    } else {
      grad_p.zero_();
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
