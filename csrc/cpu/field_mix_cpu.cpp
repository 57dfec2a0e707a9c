// The CPU field-mixing ops (TORCH_LIBRARY_IMPL(dagfm_ext, CPU)): float32 and float64 run the
// kernels of field_mix.h, other dtypes the composite form (field_mix_ops.cpp).
//
// Forward: the samples split over the threads (only where each gets kMinFlopsPerThread of work).
// Backward: one pass over tiles of samples computes both C^T g[b] and the tile's share of
// grad_C = sum_b g[b] x[b]^T while the tile is in cache. grad_C is summed per gradient chunk
// (fixed by the shapes, work_split.h) and the chunks' partials in chunk order, so the result is
// bit-identical for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../field_mix_ops.h"
#include "buffer_pool.h"
#include "field_mix.h"
#include "isa.h"
#include "work_split.h"

namespace dagfm {
namespace {

// Samples per backward tile: the tile's g and x rows (2 x 32 x F x D values, 160 KB at F=39, D=16
// in float32) stay in L2 while every register block of grad_C passes over them (32 measured a few
// percent faster than 16 and 8 at B=4096, about as fast as 64).
constexpr int kMixTileRows = 32;

struct MixWorkspace;  // thread_workspace tag: the mixing's scratch, apart from the propagation's

template <typename T>
struct MixCall {
  const T* connect;  // C for the forward, C^T for grad_x
  const T* x;
  T* out;
  int F, D;
};

#ifdef DAGFM_CPU_VECTORS
// Row length of a tile at kBytes vectors: D where whole vectors fit, else padded.
template <typename T, int kBytes>
DAGFM_HD int padded_row(int D) {
  constexpr int kW = cpu::Vec<T, kBytes>::lanes;
  return (D + kW - 1) / kW * kW;
}

// S samples of F rows, D values -> R values (zero padded) or back.
template <typename T>
DAGFM_HD void copy_rows(const T* src, int src_row, T* dst, int dst_row, int64_t rows, int D) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * dst_row, src + r * src_row, sizeof(T) * D);
    for (int d = D; d < dst_row; ++d) dst[r * dst_row + d] = T(0);
  }
}

// out[b] = C x[b] for b in [b0, b1).
template <typename T, int kBytes>
DAGFM_HD void mix_range(const MixCall<T>& call, int64_t b0, int64_t b1, T* ws) {
  const int F = call.F, D = call.D, R = padded_row<T, kBytes>(D);
  const int64_t FD = int64_t(F) * D, FR = int64_t(F) * R;
  if (R == D) return cpu::mix_tile<T, kBytes>(call.connect, F, R, call.x + b0 * FD, call.out + b0 * FD, b1 - b0);
  T* xp = ws;
  T* op = xp + kMixTileRows * FR;
  for (int64_t b = b0; b < b1; b += kMixTileRows) {
    const int64_t S = std::min<int64_t>(kMixTileRows, b1 - b);
    copy_rows(call.x + b * FD, D, xp, R, S * F, D);
    cpu::mix_tile<T, kBytes>(call.connect, F, R, xp, op, S);
    copy_rows(op, R, call.out + b * FD, D, S * F, D);
  }
}

// The backward of samples [b0, b1): grad_x rows (call: C^T, g, grad_x) and that range's grad_C,
// written to grad_c (F x F). ws: F * F accumulators, then the padded tiles where D needs them.
template <typename T, int kBytes>
DAGFM_HD void mix_backward_range(const MixCall<T>& call, const T* x, T* grad_c, int64_t b0, int64_t b1, T* ws) {
  using V = typename cpu::Vec<T, kBytes>::type;
  constexpr int kW = cpu::Vec<T, kBytes>::lanes;
  const int F = call.F, D = call.D, R = padded_row<T, kBytes>(D);
  const int64_t FD = int64_t(F) * D, FR = int64_t(F) * R, FF = int64_t(F) * F;
  V* acc = reinterpret_cast<V*>(ws);
  for (int64_t i = 0; i < FF; ++i) acc[i] = V{};
  T* gp = ws + FF * kW;
  T* xp = gp + kMixTileRows * FR;
  T* op = xp + kMixTileRows * FR;
  for (int64_t b = b0; b < b1; b += kMixTileRows) {
    const int64_t S = std::min<int64_t>(kMixTileRows, b1 - b);
    const T* g = call.x + b * FD;
    if (R == D) {
      cpu::mix_tile<T, kBytes>(call.connect, F, R, g, call.out + b * FD, S);
      cpu::gram_tile<T, kBytes>(g, x + b * FD, F, R, S, acc);
    } else {
      copy_rows(g, D, gp, R, S * F, D);
      copy_rows(x + b * FD, D, xp, R, S * F, D);
      cpu::mix_tile<T, kBytes>(call.connect, F, R, gp, op, S);
      copy_rows(op, R, call.out + b * FD, D, S * F, D);
      cpu::gram_tile<T, kBytes>(gp, xp, F, R, S, acc);
    }
  }
  cpu::gram_lane_sums<T, kBytes>(acc, FF, grad_c);
}
#endif  // DAGFM_CPU_VECTORS

template <typename T>
void mix_range_generic(const MixCall<T>& call, int64_t b0, int64_t b1, T*) {
  const int64_t FD = int64_t(call.F) * call.D;
  cpu::mix_rows_scalar(call.connect, call.x + b0 * FD, call.out + b0 * FD, b1 - b0, call.F, call.D);
}
template <typename T>
void mix_backward_range_generic(const MixCall<T>& call, const T* x, T* grad_c, int64_t b0, int64_t b1, T*) {
  const int64_t FD = int64_t(call.F) * call.D;
  mix_range_generic<T>(call, b0, b1, nullptr);
  std::fill(grad_c, grad_c + int64_t(call.F) * call.F, T(0));
  cpu::gram_rows_scalar(call.x + b0 * FD, x + b0 * FD, grad_c, b1 - b0, call.F, call.D);
}

// The vector width per call: the widest whose lanes divide D (no padding); where none of the two
// widest do, the widest, padded.
#if DAGFM_X86_DISPATCH
template <typename T, int kBytes>
bool use_half_width(int D) {
  constexpr int kW = cpu::Vec<T, kBytes>::lanes;
  return D % kW != 0 && D % (kW / 2) == 0;
}
template <typename T>
DAGFM_TARGET_AVX2 void mix_range_avx2(const MixCall<T>& call, int64_t b0, int64_t b1, T* ws) {
  if (use_half_width<T, 32>(call.D)) return mix_range<T, 16>(call, b0, b1, ws);
  mix_range<T, 32>(call, b0, b1, ws);
}
template <typename T>
DAGFM_TARGET_AVX2 void mix_backward_range_avx2(const MixCall<T>& call, const T* x, T* gc, int64_t b0, int64_t b1,
                                               T* ws) {
  if (use_half_width<T, 32>(call.D)) return mix_backward_range<T, 16>(call, x, gc, b0, b1, ws);
  mix_backward_range<T, 32>(call, x, gc, b0, b1, ws);
}
template <typename T>
DAGFM_TARGET_AVX512 void mix_range_avx512(const MixCall<T>& call, int64_t b0, int64_t b1, T* ws) {
  if (use_half_width<T, 64>(call.D)) return mix_range<T, 32>(call, b0, b1, ws);
  mix_range<T, 64>(call, b0, b1, ws);
}
template <typename T>
DAGFM_TARGET_AVX512 void mix_backward_range_avx512(const MixCall<T>& call, const T* x, T* gc, int64_t b0,
                                                   int64_t b1, T* ws) {
  if (use_half_width<T, 64>(call.D)) return mix_backward_range<T, 32>(call, x, gc, b0, b1, ws);
  mix_backward_range<T, 64>(call, x, gc, b0, b1, ws);
}
#endif

// Workspace values one thread needs (the widest case of the ISA: full-width accumulators, rows
// padded to the widest vector).
template <typename T>
int64_t workspace_numel(int F, int D, bool backward) {
  constexpr int kW = 64 / int(sizeof(T));
  const int R = (D + kW - 1) / kW * kW;
  const int64_t tiles = backward ? 3 : 2;
  return (backward ? int64_t(F) * F * kW : 0) + tiles * kMixTileRows * F * R;
}

template <typename T>
void mix_range_isa(const MixCall<T>& call, int64_t b0, int64_t b1, T* ws) {
#if DAGFM_X86_DISPATCH
  if (cpu_isa() == CpuIsa::Avx512) return mix_range_avx512(call, b0, b1, ws);
  if (cpu_isa() == CpuIsa::Avx2) return mix_range_avx2(call, b0, b1, ws);
#endif
  mix_range_generic(call, b0, b1, ws);
}

template <typename T>
void mix_backward_range_isa(const MixCall<T>& call, const T* x, T* gc, int64_t b0, int64_t b1, T* ws) {
#if DAGFM_X86_DISPATCH
  if (cpu_isa() == CpuIsa::Avx512) return mix_backward_range_avx512(call, x, gc, b0, b1, ws);
  if (cpu_isa() == CpuIsa::Avx2) return mix_backward_range_avx2(call, x, gc, b0, b1, ws);
#endif
  mix_backward_range_generic(call, x, gc, b0, b1, ws);
}

int64_t mix_flops_per_sample(const FieldMixArgs& args) {
  return 2 * int64_t(args.num_fields) * args.num_fields * args.embed_dim;
}

template <typename T>
void mix_forward(const FieldMixArgs& args, at::Tensor& out) {
  const MixCall<T> call{args.connect.data_ptr<T>(), args.x.data_ptr<T>(), out.data_ptr<T>(), args.num_fields,
                        args.embed_dim};
  const int64_t grain = grain_for(mix_flops_per_sample(args));
  at::parallel_for(0, args.batch, grain, [&](int64_t b0, int64_t b1) {
    T* ws = thread_workspace<T, MixWorkspace>(workspace_numel<T>(call.F, call.D, false));
    mix_range_isa(call, b0, b1, ws);
  });
}

template <typename T>
void mix_backward(const FieldMixArgs& args, const at::Tensor& grad, const at::Tensor& connect_t, at::Tensor& grad_x,
                  at::Tensor& grad_c) {
  const int F = args.num_fields;
  const int64_t FF = int64_t(F) * F;
  const MixCall<T> call{connect_t.data_ptr<T>(), grad.data_ptr<T>(), grad_x.data_ptr<T>(), F, args.embed_dim};
  const T* x = args.x.data_ptr<T>();
  const ChunkPlan plan = plan_gradient_chunks(args.batch, FF * int64_t(sizeof(T)));
  // The first chunk writes grad_c itself, every other its partial (each chunk writes its sum).
  std::vector<T> partials((plan.num_chunks - 1) * FF);
  const int64_t grain = grain_for(2 * mix_flops_per_sample(args) * plan.chunk_rows);
  at::parallel_for(0, plan.num_chunks, grain, [&](int64_t c0, int64_t c1) {
    T* ws = thread_workspace<T, MixWorkspace>(workspace_numel<T>(F, call.D, true));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * plan.chunk_rows, b1 = std::min(args.batch, b0 + plan.chunk_rows);
      mix_backward_range_isa(call, x, c == 0 ? grad_c.data_ptr<T>() : partials.data() + (c - 1) * FF, b0, b1, ws);
    }
  });
  add_partials(partials.data(), plan.num_chunks - 1, FF, grad_c.data_ptr<T>());
}

bool has_kernels(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
}

at::Tensor field_mix_cpu(const at::Tensor& x, const at::Tensor& connect) {
  const FieldMixArgs args = check_field_mix_args(x, connect);
  if (!has_kernels(args.x)) return field_mix_composite(args);
  at::Tensor out = pooled_empty(args.x.sizes(), args.x.options());
  if (args.batch == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(args.x.scalar_type(), "field_mix_cpu", [&] { mix_forward<scalar_t>(args, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> field_mix_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& connect) {
  const FieldMixArgs args = check_field_mix_args(x, connect);
  const at::Tensor g = check_field_mix_grad(grad, args);
  if (!has_kernels(args.x)) return field_mix_bwd_composite(g, args);
  at::Tensor grad_x = pooled_empty(args.x.sizes(), args.x.options());
  at::Tensor grad_c = at::zeros_like(args.connect);
  if (args.batch == 0) return {grad_x, grad_c};
  const at::Tensor connect_t = args.connect.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(args.x.scalar_type(), "field_mix_bwd_cpu",
                             [&] { mix_backward<scalar_t>(args, g, connect_t, grad_x, grad_c); });
  return {grad_x, grad_c};
}

}  // namespace
}  // namespace dagfm

TORCH_LIBRARY_IMPL(dagfm_ext, CPU, m) {
  m.impl("field_mix", &dagfm::field_mix_cpu);
  m.impl("field_mix_bwd", &dagfm::field_mix_bwd_cpu);
}
