// Host test of the CUDA kernels' tile arithmetic (csrc/cuda/one_output_per_thread.cuh), no GPU needed.
// The per-block drivers run here with a team of one thread, block after block, and are compared
// with the per-sample functions of dagfm_math.h (which the CPU tests check against autograd).
// Covers: every interaction, staged (any chunk size) and fallback layouts, the forward's kept
// messages and a backward that reads them instead of recomputing, the gradient of the sum
// z = h^0 + ... + h^L (grad_sum) next to the states' one, partial tiles, grids
// smaller than the tile count (per-block partial sums over several tiles), L = 0, and the launch
// planner. Lower-triangle weights, buffers and outputs are poisoned with NaN, so a read of an
// unused weight or of an unwritten value fails the comparison.
//
//   g++ -std=c++17 -O1 -fopenmp-simd -Wall -Wextra -Werror -I csrc tests/cuda_host/tile_host_test.cpp -o t && ./t
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "host_check.h"
#include "per_sample_reference.h"
#include "cuda/one_output_per_thread.cuh"

using namespace dagfm;
using namespace dagfm::cuda;
using namespace dagfm::cuda::one_output;
using namespace host_check;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Problem {
  Interaction kind;
  int64_t B;
  int F, D, L;
  std::vector<double> h0, p, q, gs;
  std::vector<double> gsum;  // dLoss/dz (B, F, D), or empty: no gradient on z
};

Problem make_problem(Interaction kind, int64_t B, int F, int D, int L, std::mt19937_64& rng,
                     bool with_sum) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Problem pr{kind, B, F, D, L, {}, {}, {}, {}, {}};
  const int64_t FD = int64_t(F) * D;
  const int64_t elems = kind == Interaction::Kernel ? int64_t(D) * D : D;
  pr.h0.resize(B * FD);
  for (auto& v : pr.h0) v = u(rng);
  pr.p.resize(int64_t(L) * F * F * elems);
  if (kind == Interaction::Outer) pr.q.resize(int64_t(L) * F * F * D);
  pr.gs.resize(B * (L + 1) * F);
  for (auto& v : pr.gs) v = u(rng);
  if (with_sum) {
    pr.gsum.resize(B * FD);
    for (auto& v : pr.gsum) v = u(rng);
  }
  // Upper triangle random, strictly lower triangle NaN: it must never be read.
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < F; ++i)
      for (int j = 0; j < F; ++j) {
        for (int64_t x = 0; x < elems; ++x)
          pr.p[((int64_t(l) * F + i) * F + j) * elems + x] = j >= i ? u(rng) : kNaN;
        if (kind == Interaction::Outer)
          for (int x = 0; x < D; ++x)
            pr.q[((int64_t(l) * F + i) * F + j) * D + x] = j >= i ? u(rng) : kNaN;
      }
  return pr;
}

struct Result {
  std::vector<double> states, grad_h0, grad_p, grad_q, messages;
};

Result reference(const Problem& pr) {
  const int F = pr.F, D = pr.D, L = pr.L;
  const int64_t FD = int64_t(F) * D;
  Result r;
  r.states.assign(pr.B * (L + 1) * F, 0.0);
  r.grad_h0.assign(pr.B * FD, 0.0);
  r.grad_p.assign(pr.p.size(), 0.0);
  r.grad_q.assign(pr.q.size(), 0.0);
  r.messages.assign(pr.B * L * int64_t(F) * D, 0.0);
  std::vector<double> ws(sample_workspace_numel(F, D, L));
  const double* q = pr.q.empty() ? nullptr : pr.q.data();
  double* gq = pr.q.empty() ? nullptr : r.grad_q.data();
  for (int64_t b = 0; b < pr.B; ++b) {
    tile_forward<double, double>(pr.kind, pr.h0.data() + b * FD, pr.p.data(), q,
                                 r.states.data() + b * (L + 1) * F, ws.data(), F, D, L, 1,
                                 r.messages.data() + b * L * FD);
    tile_backward<double, double>(pr.kind, pr.h0.data() + b * FD, pr.p.data(), q,
                                  pr.gs.data() + b * (L + 1) * F, r.grad_h0.data() + b * FD,
                                  r.grad_p.data(), gq, ws.data(), F, D, L, 1, nullptr,
                                  pr.gsum.empty() ? nullptr : pr.gsum.data() + b * FD);
  }
  // tile_backward only ever touches the upper triangle; the lower one stays exactly zero.
  return r;
}

// keep_messages: the forward writes a^1..a^L (as the CUDA training forward does) and the
// backward reads them instead of recomputing.
template <Interaction K>
Result run_tiles(const Problem& pr, const LaunchPlan& fwd_plan, const LaunchPlan& bwd_plan,
                 int64_t fwd_grid, int64_t bwd_grid, bool keep_messages) {
  const int F = pr.F, D = pr.D, L = pr.L;
  Result r;
  r.states.assign(pr.B * (L + 1) * F, kNaN);
  r.grad_h0.assign(pr.h0.size(), kNaN);
  r.grad_p.assign(pr.p.size(), kNaN);
  r.grad_q.assign(pr.q.size(), kNaN);
  const double* q = pr.q.empty() ? nullptr : pr.q.data();

  PropagateParams<double> fp;
  fp.h0 = pr.h0.data();
  fp.p = pr.p.data();
  fp.q = q;
  fp.states = r.states.data();
  fp.batch = pr.B;
  fp.num_fields = F;
  fp.embed_dim = D;
  fp.depth = L;
  fp.interaction = K;
  if (keep_messages) {
    r.messages.assign(pr.B * L * int64_t(F) * D, kNaN);
    fp.messages = r.messages.data();
  }
  {
    std::vector<double> smem(fwd_plan.smem_bytes / sizeof(double) + 1, kNaN);
    std::vector<double> ws(fwd_grid * fwd_plan.ws_block_numel + 1, kNaN);
    for (int64_t blk = 0; blk < fwd_grid; ++blk)
      forward_block<K, double, double>(fp, fwd_plan.cfg, blk, fwd_grid,
                                       reinterpret_cast<unsigned char*>(smem.data()), ws.data(),
                                       fwd_plan.ws_block_numel, Team{0, 1});
  }

  PropagateBackwardParams<double> bp;
  static_cast<PropagateParams<double>&>(bp) = fp;
  bp.states = nullptr;
  bp.messages = nullptr;
  bp.saved_messages = keep_messages ? r.messages.data() : nullptr;
  bp.grad_states = pr.gs.data();
  bp.grad_sum = pr.gsum.empty() ? nullptr : pr.gsum.data();
  bp.grad_h0 = r.grad_h0.data();
  bp.grad_p = r.grad_p.data();
  bp.grad_q = q == nullptr ? nullptr : r.grad_q.data();
  std::vector<double> smem(bwd_plan.smem_bytes / sizeof(double) + 1, kNaN);
  std::vector<double> ws(bwd_grid * bwd_plan.ws_block_numel + 1, kNaN);
  for (int64_t blk = 0; blk < bwd_grid; ++blk)
    backward_block<K, double, double>(bp, bwd_plan.cfg, blk, bwd_grid,
                                      reinterpret_cast<unsigned char*>(smem.data()), ws.data(),
                                      bwd_plan.ws_block_numel, Team{0, 1});
  const int64_t elems = edge_elems<K>(D);
  for (int64_t idx = 0; idx < int64_t(r.grad_p.size()); ++idx)
    reduce_weight_grad_element<double, double>(idx, ws.data(), bwd_plan.ws_block_numel, bwd_grid,
                                               0, F, elems, r.grad_p.data());
  for (int64_t idx = 0; idx < int64_t(r.grad_q.size()); ++idx)
    reduce_weight_grad_element<double, double>(idx, ws.data(), bwd_plan.ws_block_numel, bwd_grid,
                                               int64_t(L) * num_edges(F) * elems, F, D,
                                               r.grad_q.data());
  return r;
}

// A plan with a chosen tile and chunk, laid out exactly as plan_launch lays out its own.
LaunchPlan manual_plan(Pass pass, Interaction kind, int F, int D, int L, int tile_b,
                       int64_t chunk_edges, bool staged) {
  LaunchPlan plan = plan_launch<double, double>(pass, kind, 1, F, D, L, DeviceLimits{1 << 30, 1});
  const bool outer = kind == Interaction::Outer;
  const int64_t elems = kind == Interaction::Kernel ? int64_t(D) * D : D;
  TileConfig& cfg = plan.cfg;
  cfg.tile_b = tile_b;
  cfg.staged = staged;
  cfg.chunk_edges = staged ? chunk_edges : num_edges(F);
  const int64_t parts =
      pass == Pass::Backward ? int64_t(L) * num_edges(F) * (elems + (outer ? D : 0)) : 0;
  plan.smem_bytes = staged ? int64_t(sizeof(double)) *
                                 (tile_acc_numel(cfg, F, D) + cfg.chunk_edges * elems * (outer ? 2 : 1))
                           : 0;
  plan.ws_block_numel = parts + (staged ? 0 : tile_acc_numel(cfg, F, D));
  return plan;
}

template <Interaction K>
void check_case(const Problem& pr, const Result& ref, int tile_b, int64_t chunk_edges, bool staged,
                int64_t grid) {
  char ctx[200];
  std::snprintf(ctx, sizeof ctx, "kind=%d B=%lld F=%d D=%d L=%d tile_b=%d chunk=%lld staged=%d grid=%lld sum=%d",
                int(K), (long long)pr.B, pr.F, pr.D, pr.L, tile_b, (long long)chunk_edges, int(staged),
                (long long)grid, int(!pr.gsum.empty()));
  const LaunchPlan fwd = manual_plan(Pass::Forward, K, pr.F, pr.D, pr.L, tile_b, chunk_edges, staged);
  const LaunchPlan bwd = manual_plan(Pass::Backward, K, pr.F, pr.D, pr.L, tile_b, chunk_edges, staged);
  const int64_t tiles = ceil_div64(pr.B, tile_b);
  const int64_t g = grid < tiles ? grid : tiles;
  for (bool keep : {false, true}) {
    const Result got = run_tiles<K>(pr, fwd, bwd, g, g, keep);
    ++g_cases;
    const double tol = 1e-12;
    expect(rel_err(got.states, ref.states) < tol, "states", ctx);
    if (keep) expect(rel_err(got.messages, ref.messages) < tol, "messages", ctx);
    expect(rel_err(got.grad_h0, ref.grad_h0) < tol, keep ? "grad_h0 (saved messages)" : "grad_h0", ctx);
    expect(rel_err(got.grad_p, ref.grad_p) < tol, keep ? "grad_p (saved messages)" : "grad_p", ctx);
    expect(rel_err(got.grad_q, ref.grad_q) < tol, keep ? "grad_q (saved messages)" : "grad_q", ctx);
    // Lower triangle of the weight gradients: exactly zero.
    const int64_t elems = edge_elems<K>(pr.D);
    bool zero = true;
    for (int l = 0; l < pr.L; ++l)
      for (int i = 0; i < pr.F; ++i)
        for (int j = 0; j < i; ++j) {
          for (int64_t x = 0; x < elems; ++x)
            zero &= got.grad_p[((int64_t(l) * pr.F + i) * pr.F + j) * elems + x] == 0.0;
          if (K == Interaction::Outer)
            for (int x = 0; x < pr.D; ++x)
              zero &= got.grad_q[((int64_t(l) * pr.F + i) * pr.F + j) * pr.D + x] == 0.0;
        }
    expect(zero, "lower-triangle gradients exactly zero", ctx);
  }
}

template <Interaction K>
void check_kind(std::mt19937_64& rng) {
  struct Shape {
    int64_t B;
    int F, D, L;
  };
  const Shape shapes[] = {{1, 1, 1, 1}, {5, 3, 2, 2}, {7, 5, 3, 3}, {4, 4, 2, 0}, {9, 6, 1, 1}, {3, 7, 4, 2}};
  for (const Shape& s : shapes) {
    // Every other shape also has a gradient on the sum z = h^0 + ... + h^L.
    const Problem pr = make_problem(K, s.B, s.F, s.D, s.L, rng, (&s - shapes) % 2 == 1);
    const Result ref = reference(pr);
    const int64_t edges = num_edges(s.F);
    const int64_t chunks[] = {s.F, s.F + 1, 2 * s.F, edges};
    for (int tile_b : {1, 2, 3, 8})
      for (int64_t grid : {int64_t(1), int64_t(2), int64_t(1) << 20}) {
        for (int64_t chunk : chunks) check_case<K>(pr, ref, tile_b, chunk < edges ? chunk : edges, true, grid);
        check_case<K>(pr, ref, tile_b, edges, false, grid);
      }
  }
}

// The planner never plans a staged layout over the limit, always leaves one row per chunk, and
// falls back instead of failing.
void check_planner() {
  const Interaction kinds[] = {Interaction::Inner, Interaction::Outer, Interaction::Kernel};
  const int64_t limits[] = {0, 1024, 48 * 1024, 99 * 1024, 163 * 1024, 227 * 1024};
  int fallback = 0, staged = 0;
  for (Interaction kind : kinds)
    for (int64_t lim : limits)
      for (Pass pass : {Pass::Forward, Pass::Backward})
        for (int F : {1, 8, 39, 200})
          for (int D : {1, 16, 64})
            for (int L : {0, 3})
              for (int64_t B : {1, 100, 65536}) {
                char ctx[160];
                std::snprintf(ctx, sizeof ctx, "planner kind=%d lim=%lld pass=%d F=%d D=%d L=%d B=%lld",
                              int(kind), (long long)lim, int(pass), F, D, L, (long long)B);
                const LaunchPlan p = plan_launch<float, float>(pass, kind, B, F, D, L, DeviceLimits{lim, 132});
                const TileConfig& c = p.cfg;
                expect(c.tile_b >= 1 && c.tile_b <= kMaxTileB, "tile_b in range", ctx);
                expect(c.chunk_edges <= num_edges(F), "chunk within the triangle", ctx);
                if (c.staged) {
                  ++staged;
                  const int64_t elems = kind == Interaction::Kernel ? int64_t(D) * D : D;
                  const int64_t w = (kind == Interaction::Outer ? 2 : 1) * elems * 4;
                  expect(p.smem_bytes <= lim, "shared memory within the opt-in limit", ctx);
                  expect(c.chunk_edges >= F, "one row fits", ctx);
                  expect(p.smem_bytes == tile_acc_numel(c, F, D) * 4 + c.chunk_edges * w, "smem size", ctx);
                } else {
                  ++fallback;
                  expect(p.smem_bytes == 0 && c.chunk_edges == num_edges(F), "fallback layout", ctx);
                }
              }
  expect(staged > 0 && fallback > 0, "planner exercised both paths", "planner");
  // The shapes the CUDA tests rely on (H100/H200 opt-in limit 227 KB, 132 SMs).
  const DeviceLimits h200{232448, 132};
  expect(plan_launch<float, float>(Pass::Forward, Interaction::Inner, 65536, 39, 16, 3, h200).cfg.staged,
         "F=39 D=16 inner forward on chip", "planner");
  expect(plan_launch<float, float>(Pass::Backward, Interaction::Kernel, 65536, 39, 16, 3, h200).cfg.staged,
         "F=39 D=16 kernel backward on chip", "planner");
  expect(!plan_launch<float, float>(Pass::Backward, Interaction::Inner, 64, 200, 64, 3, h200).cfg.staged,
         "F=200 D=64 backward takes the fallback", "planner");
  expect(choose_grid(10, 264, 0) == 10 && choose_grid(1000, 264, 0) == 264, "grid", "planner");
  expect(choose_grid(1000, 264, kWorkspaceBudgetBytes) == 1, "grid under the workspace budget", "planner");
  expect(choose_grid(1000, 264, 4 * kWorkspaceBudgetBytes) == 1, "grid at least one", "planner");
}

}  // namespace

int main() {
  std::mt19937_64 rng(20240611);
  check_kind<Interaction::Inner>(rng);
  check_kind<Interaction::Outer>(rng);
  check_kind<Interaction::Kernel>(rng);
  check_planner();
  return report("tile_host_test");
}
