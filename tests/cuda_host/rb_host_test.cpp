// Host test of the register-blocked forward (csrc/cuda/register_blocked_*.cuh), no GPU needed. The block
// driver runs here with a team of one thread and with blocks of emulated threads (each phase run
// thread after thread), block after block, on shared memory poisoned with NaN and weights whose
// lower triangle is NaN, and is compared with dagfm_math.h's per-sample forward (which the CPU
// tests check against autograd). Covers both interactions, both sample blocks (kb = 4, 8), every
// tile size, chunks of 1 row up to the whole triangle, partial tiles, grids smaller than the tile
// count, L = 0, D and F not multiples of 4, F > 64, D > 32, the kernel interaction's column
// blocks, the inner backward (layer-major, saved messages), and the planners' limits.
//
//   g++ -std=c++17 -O1 -fopenmp-simd -Wall -Wextra -Werror -I csrc tests/cuda_host/rb_host_test.cpp -o t && ./t
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "host_check.h"
#include "per_sample_reference.h"
#include "cuda/register_blocked_launch.cuh"
#include "cuda/weight_grad_reduce.cuh"

using namespace dagfm;
using namespace dagfm::cuda;
using namespace host_check;

namespace {

struct Problem {
  Interaction kind;
  int64_t B;
  int F, D, L;
  std::vector<double> h0, p, q;
};

Problem make_problem(Interaction kind, int64_t B, int F, int D, int L, std::mt19937_64& rng) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Problem pr{kind, B, F, D, L, {}, {}, {}};
  pr.h0.resize(B * F * D);
  for (auto& v : pr.h0) v = u(rng);
  const int64_t elems = kind == Interaction::Kernel ? int64_t(D) * D : D;
  const int64_t n = int64_t(L) * F * F * elems;
  pr.p.resize(n);
  if (kind == Interaction::Outer) pr.q.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    const int j = int((k / elems) % F), i = int((k / elems / F) % F);
    // Scaled so that states stay O(1) through the layers; the lower triangle must never be read.
    pr.p[k] = j >= i ? u(rng) / (kind == Interaction::Kernel ? D : 1) : nan;
    if (kind == Interaction::Outer) pr.q[k] = j >= i ? u(rng) : nan;
  }
  return pr;
}

// States, then the messages a^1..a^L (B, L, F, D) appended: what a training forward writes.
std::vector<double> reference(const Problem& pr) {
  const int F = pr.F, D = pr.D, L = pr.L;
  const int64_t FD = int64_t(F) * D;
  std::vector<double> out(pr.B * (L + 1) * F + pr.B * L * FD);
  std::vector<double> ws(sample_workspace_numel(F, D, L));
  double* msg = out.data() + pr.B * (L + 1) * F;
  for (int64_t b = 0; b < pr.B; ++b)
    tile_forward<double, double>(pr.kind, pr.h0.data() + b * FD, pr.p.data(),
                                 pr.q.empty() ? nullptr : pr.q.data(), out.data() + b * (L + 1) * F,
                                 ws.data(), F, D, L, 1, msg + b * L * FD);
  return out;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// Runs each phase of a tile as `size` threads, one after another (a block on the GPU runs them at
// once; each phase's threads write disjoint elements and read only earlier phases' results).
// A thread's state kept across phases (registers on the GPU) lives in one slot per emulated thread.
struct SerialExec {
  int size;
  template <typename Phase>
  void operator()(const Phase& phase, bool = true) const {
    for (int r = 0; r < size; ++r) phase(Team{r, size});
  }
  template <typename Local>
  Local& local(Local&, Team tm) const {
    static std::vector<Local> slots;
    if (int(slots.size()) < size) slots.resize(size);
    return slots[tm.rank];
  }
};

template <Interaction K, typename T>
std::vector<T> run_blocks(const Problem& pr, const rb::RbConfig& c, int64_t grid, int threads = 1) {
  const std::vector<T> h0 = cast<T>(pr.h0), p = cast<T>(pr.p), q = cast<T>(pr.q);
  const int64_t nstates = pr.B * (pr.L + 1) * pr.F;
  // States then messages in one buffer, laid out as reference() returns them.
  std::vector<T> states(nstates + pr.B * pr.L * pr.F * pr.D, std::numeric_limits<T>::quiet_NaN());
  PropagateParams<T> prm;
  prm.h0 = h0.data();
  prm.p = p.data();
  prm.q = q.empty() ? nullptr : q.data();
  prm.states = states.data();
  prm.messages = states.data() + nstates;
  prm.batch = pr.B;
  prm.num_fields = pr.F;
  prm.embed_dim = pr.D;
  prm.depth = pr.L;
  prm.interaction = K;
  const int64_t numel =
      K == Interaction::Kernel
          ? rb::kernel_smem_numel(c, pr.F, pr.D)
          : 2 * int64_t(rb::state_numel(c, pr.F, pr.D)) +
                int64_t(c.rows_per_chunk) * rb::row_numel(c, pr.F, pr.D, K == Interaction::Outer);
  std::vector<T> smem(numel, std::numeric_limits<T>::quiet_NaN());
  const SerialExec exec{threads};
  for (int64_t blk = 0; blk < grid; ++blk) {
    if constexpr (K == Interaction::Kernel) {
      if (c.samples_per_thread == 8)
        rb::kernel_interaction_block<8, T, T>(prm, c, blk, grid, smem.data(), exec);
      else
        rb::kernel_interaction_block<4, T, T>(prm, c, blk, grid, smem.data(), exec);
    } else {
      if (c.samples_per_thread == 8)
        rb::forward_block<K, 8, T, T>(prm, c, blk, grid, smem.data(), exec);
      else
        rb::forward_block<K, 4, T, T>(prm, c, blk, grid, smem.data(), exec);
    }
  }
  return states;
}

template <Interaction K>
void check_kind(std::mt19937_64& rng) {
  struct Shape {
    int64_t B;
    int F, D, L;
  };
  const Shape shapes[] = {{1, 1, 1, 1},  {5, 3, 2, 2},  {7, 5, 3, 3},   {4, 4, 2, 0},  {9, 6, 1, 1},
                          {3, 7, 4, 2},  {40, 9, 5, 3}, {33, 13, 8, 2}, {70, 4, 17, 1},
                          {10, 70, 2, 1}, {6, 5, 37, 2}};
  const DeviceLimits big{int64_t(1) << 30, 1, 0, 9};
  for (const Shape& s : shapes) {
    const Problem pr = make_problem(K, s.B, s.F, s.D, s.L, rng);
    const std::vector<double> ref = reference(pr);
    for (int tb : {8, 16, 32, 64}) {
      const rb::RbPlan plan = rb::plan_forward(K, s.B, s.F, s.D, 8, big, tb);
      char ctx[200];
      std::snprintf(ctx, sizeof ctx, "kind=%d B=%lld F=%d D=%d L=%d tb=%d", int(K), (long long)s.B,
                    s.F, s.D, s.L, tb);
      expect(plan.ok && plan.cfg.tile_samples == tb && plan.cfg.rows_per_chunk == s.F, "plan with unlimited memory", ctx);
      for (int rows : {1, 2, 3, s.F}) {
        if (rows > s.F) continue;
        rb::RbConfig c = plan.cfg;
        c.rows_per_chunk = rows;
        const int64_t tiles = ceil_div64(s.B, tb);
        for (int64_t grid : {int64_t(1), int64_t(2), tiles}) {
          if (grid > tiles) continue;
          std::snprintf(ctx, sizeof ctx, "kind=%d B=%lld F=%d D=%d L=%d tb=%d rows=%d grid=%lld",
                        int(K), (long long)s.B, s.F, s.D, s.L, tb, rows, (long long)grid);
          ++g_cases;
          expect(rel_err(run_blocks<K, double>(pr, c, grid), ref) < 1e-12, "states (double)", ctx);
        }
      }
      // float storage and accumulation, as the float32 kernels run it.
      ++g_cases;
      expect(rel_err(run_blocks<K, float>(pr, plan.cfg, 1), ref) < 1e-4, "states (float)", ctx);
      // Blocks of emulated threads: the planner's count, one warp, and odd team sizes (the copy
      // loops' warp rows with a partial last warp, items split unevenly).
      for (int threads : {plan.threads, 32, 37, 96, 512}) {
        rb::RbConfig c = plan.cfg;
        c.rows_per_chunk = s.F > 2 ? s.F / 2 : s.F;  // two chunks or more where F allows
        std::snprintf(ctx, sizeof ctx, "kind=%d B=%lld F=%d D=%d L=%d tb=%d rows=%d threads=%d",
                      int(K), (long long)s.B, s.F, s.D, s.L, tb, c.rows_per_chunk, threads);
        ++g_cases;
        expect(rel_err(run_blocks<K, double>(pr, c, 2, threads), ref) < 1e-12, "states (threads)", ctx);
      }
    }
  }
}

// The kernel interaction: every tile, column blocks of 1 field up to the planner's, idle threads
// beyond the items, grids smaller than the tile count, D = 4 .. 32 (D % 4 == 0), F > 32.
void check_kernel_interaction(std::mt19937_64& rng) {
  const Interaction K = Interaction::Kernel;
  struct Shape {
    int64_t B;
    int F, D, L;
  };
  const Shape shapes[] = {{1, 1, 4, 1},  {5, 3, 4, 2},   {7, 5, 8, 3},    {4, 4, 4, 0},
                          {33, 13, 8, 2}, {9, 20, 4, 1}, {6, 3, 16, 2}, {70, 9, 12, 1},
                          {10, 40, 4, 1}, {3, 2, 32, 1}};
  const DeviceLimits big{int64_t(1) << 30, 1, 0, 9};
  for (const Shape& s : shapes) {
    const Problem pr = make_problem(K, s.B, s.F, s.D, s.L, rng);
    const std::vector<double> ref = reference(pr);
    for (int tb : {8, 16, 32, 64}) {
      const rb::RbPlan plan = rb::plan_forward(K, s.B, s.F, s.D, 8, big, tb);
      char ctx[200];
      std::snprintf(ctx, sizeof ctx, "kernel B=%lld F=%d D=%d L=%d tb=%d", (long long)s.B, s.F, s.D,
                    s.L, tb);
      expect(plan.ok && plan.cfg.tile_samples == tb, "kernel plan with unlimited memory", ctx);
      if (!plan.ok) continue;
      expect(plan.threads >= rb::kernel_items(plan.cfg, s.D), "a thread per item", ctx);
      const int64_t tiles = ceil_div64(s.B, tb);
      for (int nf : {1, 2, 3, plan.cfg.fields_per_block}) {
        if (nf > s.F || nf > plan.cfg.fields_per_block) continue;
        rb::RbConfig c = plan.cfg;
        c.fields_per_block = nf;
        const int items = rb::kernel_items(c, s.D);
        for (int threads : {(items + 31) / 32 * 32, items + 37})
          for (int64_t grid : {int64_t(1), int64_t(2), tiles}) {
            if (grid > tiles) continue;
            std::snprintf(ctx, sizeof ctx, "kernel B=%lld F=%d D=%d L=%d tb=%d nf=%d threads=%d grid=%lld",
                          (long long)s.B, s.F, s.D, s.L, tb, nf, threads, (long long)grid);
            ++g_cases;
            expect(rel_err(run_blocks<K, double>(pr, c, grid, threads), ref) < 1e-12, "states (double)", ctx);
          }
      }
      ++g_cases;
      expect(rel_err(run_blocks<K, float>(pr, plan.cfg, 1, plan.threads), ref) < 1e-4, "states (float)", ctx);
    }
  }
  expect(!rb::plan_forward(K, 100, 8, 6, 4, big).ok, "no kernel plan for D % 4 != 0", "planner");
  for (int F : {1, 8, 39, 80})
    for (int D : {4, 8, 16, 32, 64})
      for (int64_t B : {int64_t(1), int64_t(1024), int64_t(65536)}) {
        char ctx[120];
        std::snprintf(ctx, sizeof ctx, "kernel planner F=%d D=%d B=%lld", F, D, (long long)B);
        const DeviceLimits h200{227 << 10, 132, 0, 9};
        const rb::RbPlan p = rb::plan_forward(K, B, F, D, 4, h200);
        if (!p.ok) continue;
        expect(p.smem_bytes <= h200.smem_optin &&
                   p.smem_bytes == rb::kernel_smem_numel(p.cfg, F, D) * 4, "kernel smem", ctx);
        expect(p.cfg.fields_per_block >= 1 && p.cfg.fields_per_block <= F && p.cfg.fields_per_block * D <= (D > rb::kKernelCols ? D : rb::kKernelCols),
               "column block", ctx);
        expect(rb::kernel_items(p.cfg, D) <= p.threads && p.threads <= rb::kMaxThreads, "kernel threads", ctx);
        if (F == 39 && D == 16 && B == 65536) expect(p.cfg.tile_samples == 64, "F=39, D=16, B=65536 takes 64-sample tiles", ctx);
      }
}

// The inner backward, layer after layer as the launcher runs it, blocks one after another with
// emulated threads; partials added by reduce_weight_grad_element. Against dagfm_math.h's
// per-sample backward in double; the workspace starts as NaN (every slice must be written).
void check_inner_backward(std::mt19937_64& rng) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Shape {
    int64_t B;
    int F, D, L;
  };
  const Shape shapes[] = {{1, 1, 1, 1},  {5, 3, 2, 2},  {7, 5, 3, 3},   {9, 6, 1, 1},  {40, 9, 5, 3},
                          {33, 13, 8, 2}, {70, 4, 17, 1}, {17, 39, 4, 2}, {6, 5, 37, 2}};
  const DeviceLimits big{int64_t(1) << 30, 3, 0, 9};
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (const Shape& s : shapes) {
    const Problem pr = make_problem(Interaction::Inner, s.B, s.F, s.D, s.L, rng);
    const int F = s.F, D = s.D, L = s.L;
    const int64_t FD = int64_t(F) * D;
    std::vector<double> gs(s.B * (L + 1) * F);
    for (auto& v : gs) v = u(rng);
    // Every other shape also has a gradient on the sum z = h^0 + ... + h^L.
    std::vector<double> gsum((&s - shapes) % 2 == 1 ? s.B * FD : 0);
    for (auto& v : gsum) v = u(rng);
    const double* gsum_ptr = gsum.empty() ? nullptr : gsum.data();
    // Reference gradients and the forward's messages.
    std::vector<double> msgs(s.B * L * FD), ws(sample_workspace_numel(F, D, L)), ref_h0(s.B * FD);
    std::vector<double> ref_p(pr.p.size(), 0.0), states((L + 1) * F);
    for (int64_t b = 0; b < s.B; ++b) {
      tile_forward<double, double>(Interaction::Inner, pr.h0.data() + b * FD, pr.p.data(), nullptr,
                                   states.data(), ws.data(), F, D, L, 1, msgs.data() + b * L * FD);
      tile_backward<double, double>(Interaction::Inner, pr.h0.data() + b * FD, pr.p.data(), nullptr,
                                    gs.data() + b * (L + 1) * F, ref_h0.data() + b * FD, ref_p.data(),
                                    nullptr, ws.data(), F, D, L, 1, nullptr,
                                    gsum_ptr == nullptr ? nullptr : gsum_ptr + b * FD);
    }
    const rb::RbPlan plan = rb::plan_backward_inner(s.B, F, D, L, 8, big);
    char ctx[200];
    std::snprintf(ctx, sizeof ctx, "inner backward B=%lld F=%d D=%d L=%d", (long long)s.B, F, D, L);
    expect(plan.ok, "inner backward plan with unlimited memory", ctx);
    if (!plan.ok) continue;
    const int64_t tiles = ceil_div64(s.B, plan.cfg.tile_samples);
    for (int threads : {plan.threads, plan.threads + 37})
      for (int64_t grid : {int64_t(1), int64_t(2), tiles}) {
        if (grid > tiles) continue;
        std::snprintf(ctx, sizeof ctx, "inner backward B=%lld F=%d D=%d L=%d tb=%d threads=%d grid=%lld sum=%d",
                      (long long)s.B, F, D, L, plan.cfg.tile_samples, threads, (long long)grid, int(gsum_ptr != nullptr));
        std::vector<double> grad_h0(s.B * FD, nan), grad_p(pr.p.size(), nan);
        std::vector<double> work(rb::backward_inner_workspace_numel(s.B, F, D, L, grid), nan);
        std::vector<double> smem(plan.smem_bytes / sizeof(double), nan);
        PropagateBackwardParams<double> bp;
        bp.h0 = pr.h0.data();
        bp.p = pr.p.data();
        bp.batch = s.B;
        bp.num_fields = F;
        bp.embed_dim = D;
        bp.depth = L;
        bp.interaction = Interaction::Inner;
        bp.grad_states = gs.data();
        bp.saved_messages = msgs.data();
        bp.grad_sum = gsum_ptr;
        bp.grad_h0 = grad_h0.data();
        const SerialExec exec{threads};
        for (int t = L; t >= 1; --t) {
          const rb::InnerBwdArgs a = rb::inner_bwd_args(work.data(), s.B, F, D, L, t);
          for (int64_t blk = 0; blk < grid; ++blk)
            rb::inner_backward_block<double, double>(bp, a, plan.cfg, blk, grid, smem.data(), exec);
        }
        for (int64_t idx = 0; idx < int64_t(grad_p.size()); ++idx)
          reduce_weight_grad_element<double, double>(
              idx, work.data() + rb::backward_inner_part_offset(s.B, F, D),
              rb::backward_inner_part_block_numel(F, D, L), grid, 0, F, D, grad_p.data());
        ++g_cases;
        expect(rel_err(grad_h0, ref_h0) < 1e-12, "grad_h0", ctx);
        expect(rel_err(grad_p, ref_p) < 1e-12, "grad_p", ctx);
      }
  }
  for (int F : {1, 8, 23, 39, 80})
    for (int D : {1, 8, 16, 32, 64})
      for (int64_t B : {int64_t(1), int64_t(1024), int64_t(65536)}) {
        char ctx[120];
        std::snprintf(ctx, sizeof ctx, "inner backward planner F=%d D=%d B=%lld", F, D, (long long)B);
        const DeviceLimits h200{227 << 10, 132, 0, 9};
        const rb::RbPlan p = rb::plan_backward_inner(B, F, D, 3, 4, h200);
        if (!p.ok) continue;
        expect(p.smem_bytes <= h200.smem_optin && p.threads <= rb::kMaxThreads && p.threads % 32 == 0,
               "inner backward limits", ctx);
        expect(rb::bwd_block_pairs(F) * D <= rb::kBwdMaxItems * p.threads, "weight-gradient items fit", ctx);
        if (F == 39 && D == 16 && B == 65536) expect(p.cfg.tile_samples == 16, "F=39, D=16, B=65536: 16-sample tiles", ctx);
      }
  expect(!rb::plan_backward_inner(10, 4, 4, 0, 4, DeviceLimits{227 << 10, 132, 0, 9}).ok, "no plan for L = 0",
         "planner");
}

// The planner: within the opt-in limit, strides 4 mod 8, tile choice by batch, chunks evened out,
// no plan for the kernel interaction or when nothing fits.
void check_planner() {
  int plans = 0, none = 0;
  for (Interaction kind : {Interaction::Inner, Interaction::Outer})
    for (int64_t lim : {int64_t(0), int64_t(8) << 10, int64_t(48) << 10, int64_t(227) << 10})
      for (int F : {1, 8, 23, 39, 80, 200})
        for (int D : {1, 8, 16, 32, 64})
          for (int64_t B : {int64_t(1), int64_t(1024), int64_t(65536)})
            for (int acc : {4, 8}) {
              char ctx[160];
              std::snprintf(ctx, sizeof ctx, "planner kind=%d lim=%lld F=%d D=%d B=%lld acc=%d",
                            int(kind), (long long)lim, F, D, (long long)B, acc);
              const rb::RbPlan p = rb::plan_forward(kind, B, F, D, acc, DeviceLimits{lim, 132, 0, 9});
              if (!p.ok) {
                ++none;
                continue;
              }
              ++plans;
              const rb::RbConfig& c = p.cfg;
              const bool outer = kind == Interaction::Outer;
              expect(p.smem_bytes <= lim, "within the opt-in limit", ctx);
              expect(p.smem_bytes == (2 * int64_t(rb::state_numel(c, F, D)) +
                                      int64_t(c.rows_per_chunk) * rb::row_numel(c, F, D, outer)) * acc,
                     "smem size", ctx);
              expect(c.rows_per_chunk >= 1 && c.rows_per_chunk <= F, "rows in range", ctx);
              const int64_t chunks = ceil_div64(F, c.rows_per_chunk);
              expect(c.rows_per_chunk == ceil_div64(F, chunks), "chunks evened out", ctx);
              for (int s : {c.sample_stride, c.weight_stride, c.padded_dim}) expect(s % 8 == 4, "stride 4 mod 8", ctx);
              expect(c.sample_stride >= c.tile_samples && c.padded_fields >= F && c.padded_fields % 4 == 0 && c.weight_stride >= c.padded_fields && c.padded_dim >= D,
                     "strides cover their rows", ctx);
              expect(c.tile_samples % c.samples_per_thread == 0 && (c.samples_per_thread == 4 || c.samples_per_thread == 8), "sample blocks", ctx);
              expect(p.threads >= 32 && p.threads <= rb::kMaxThreads && p.threads % 32 == 0,
                     "threads", ctx);
              if (B == 65536 && lim == (int64_t(227) << 10) && F <= 39 && D <= 16 && acc == 4)
                expect(c.tile_samples >= 16, "large batches take large tiles", ctx);
              if (B == 1024) expect(c.tile_samples == 8, "small batches: a tile for every multiprocessor", ctx);
            }
  expect(!rb::plan_forward(Interaction::Inner, 100, 200, 64, 4, DeviceLimits{227 << 10, 132, 0, 9}).ok,
         "no plan when a tile's states do not fit", "planner");
  expect(plans > 0 && none > 0, "both outcomes exercised", "planner");
  std::printf("planner: %d plans, %d without\n", plans, none);
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261129);
  check_kind<Interaction::Inner>(rng);
  check_kind<Interaction::Outer>(rng);
  check_kernel_interaction(rng);
  check_inner_backward(rng);
  check_planner();
  return report("rb_host_test");
}
