// Register-blocked CUDA-core backward of the inner interaction (namespace rb; the shared layout
// and microkernel are in register_blocked.cuh). No torch includes.
//
// Inner interaction, backward, one launch per layer t = L .. 1 (layer-major: a block keeps its
// weight-gradient sums in registers over all its tiles of the layer, and the layer's weights are
// staged once per block). Needs the training forward's messages a^1..a^L. Per tile:
//   load:   A = alpha = delta^t * h0,  Hp = h^{t-1} = h0 * a^{t-1} (h0 for t = 1), samples
//           innermost; gh (+)= delta^t * a^t (the running dLoss/dh0, global, Acc)
//   delta:  delta^{t-1}[b, i, e] = G[b, t-1, i] + sum_{j >= i} p[i, j, e] alpha[b, j, e], threads
//           (pair of i groups, sample block, e), rank-1 steps over j with 4 consecutive i per
//           weight vector (Wt = p transposed, i innermost); t = 1 writes grad_h0 = gh + delta^0
//   dW:     dp[i, j, e] += sum_b Hp[b, i, e] alpha[b, j, e], threads (4x4 field block, e), sums
//           kept in registers over the tiles; 4 samples per 16-byte load
// At the end each block writes its partial sums for the layer (packed upper triangle) to its
// workspace slice; reduce_weight_grad_kernel adds the slices in block order (deterministic).
// delta^t travels between the layer launches in a global Acc buffer (B, F, D).
//
// Shared memory (Acc): A, Hp (F*D, sample_stride) and Wt (F, D, weight_stride).
#pragma once

#include <cstdint>

#include "register_blocked.cuh"

namespace dagfm {
namespace cuda {
namespace rb {

constexpr int kBwdSampleBlock = 4;  // samples per thread in the delta products
constexpr int kBwdMaxItems = 4;     // weight-gradient items (4x4 field block, e) per thread

struct InnerBwdArgs {
  int t;
  const void* delta_in;  // Acc (B, F, D): delta^t; nullptr for t = L (then G[L] broadcast)
  void* delta_out;       // Acc (B, F, D): delta^{t-1} (t >= 2)
  void* gh;              // Acc (B, F, D): running dLoss/dh0 without delta^0
  void* part;            // Acc workspace: per block (L, E, D) partial sums
  int64_t part_block_numel;
};

DAGFM_HD int bwd_block_pairs(int F) {
  const int G = groups_of(F);
  return G * (G + 1) / 2;
}

// Field-block pair number k -> (gi, gj), gi <= gj, row-major over the upper triangle of blocks.
DAGFM_HD void bwd_block_pair(int k, int G, int& gi, int& gj) {
  gi = 0;
  while (k >= G - gi) {
    k -= G - gi;
    ++gi;
  }
  gj = gi + k;
}

inline RbPlan plan_backward_inner(int64_t batch, int F, int D, int L, int acc_size,
                                  const DeviceLimits& lim) {
  RbPlan plan;
  if (F < 1 || D < 1 || L < 1 || acc_size <= 0) return plan;
  for (int tb : {16, 8}) {
    if (!tile_allowed(tb, batch, lim, 0)) continue;
    RbConfig c = tile_config(tb, kBwdSampleBlock);
    c.padded_fields = groups_of(F) * kJ;
    c.weight_stride = pad_stride(c.padded_fields);
    const int64_t bytes = (2 * int64_t(F) * D * c.sample_stride + int64_t(F) * D * c.weight_stride) * acc_size;
    if (bytes > lim.smem_optin) continue;
    const int delta_items = (groups_of(F) + 1) / 2 * (tb / c.samples_per_thread) * D;
    const int dw_items = bwd_block_pairs(F) * D;
    int threads = (delta_items + 31) / 32 * 32;
    const int need = (dw_items + kBwdMaxItems - 1) / kBwdMaxItems;
    if (threads < need) threads = (need + 31) / 32 * 32;
    if (threads > kMaxThreads) continue;
    plan.cfg = c;
    plan.threads = threads;
    plan.smem_bytes = bytes;
    plan.ok = true;
    return plan;
  }
  return plan;
}

template <typename Acc>
struct InnerBwdLocal {
  Acc dw[kBwdMaxItems][kJ][kJ];
};

// Wt[j, e, ii] = p[ii, j, e] for ii <= j (ii < F), else 0, for ii < padded_fields. Rows (j, e), columns ii.
template <typename T, typename Acc>
DAGFM_HD void stage_weights_by_target(const T* DAGFM_RESTRICT p, Acc* DAGFM_RESTRICT wt, int F,
                                      int D, const RbConfig& c, Team team) {
  const WarpRows wr = warp_rows(team);
  for (int r = wr.warp; r < F * D; r += wr.warps) {
    const int j = r / D, e = r % D;
    for (int ii = wr.lane; ii < c.padded_fields; ii += wr.lanes)
      wt[r * c.weight_stride + ii] = (ii <= j && ii < F) ? cvt<Acc>(p[(int64_t(ii) * F + j) * D + e]) : Acc(0);
  }
}

template <typename T, typename Acc, typename Exec>
DAGFM_HD void inner_backward_tile(const PropagateBackwardParams<T>& prm, const InnerBwdArgs& a,
                                  const RbConfig& c, Acc* smem, int64_t b0, const Exec& exec,
                                  InnerBwdLocal<Acc>& mine) {
  constexpr int kB = kBwdSampleBlock;
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth, t = a.t;
  const int FD = F * D;
  const int G = groups_of(F);
  const int nb = int(imin64(c.tile_samples, prm.batch - b0));
  const int nbg = c.tile_samples / kB;
  const int64_t srow = int64_t(L + 1) * F;
  Acc* A = smem;
  Acc* Hp = smem + FD * c.sample_stride;
  const Acc* Wt = Hp + FD * c.sample_stride;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  const T* DAGFM_RESTRICT gs = prm.grad_states + b0 * srow;
  const T* DAGFM_RESTRICT msg = prm.saved_messages + b0 * int64_t(L) * FD;
  const T* DAGFM_RESTRICT gsum = prm.grad_sum == nullptr ? nullptr : prm.grad_sum + b0 * FD;
  const Acc* DAGFM_RESTRICT din = static_cast<const Acc*>(a.delta_in) + (a.delta_in ? b0 * FD : 0);
  Acc* DAGFM_RESTRICT gh = static_cast<Acc*>(a.gh) + b0 * FD;

  exec([&](Team tm) {  // load: rows b, columns (i, e): coalesced global reads
    const WarpRows wr = warp_rows(tm);
    for (int b = wr.warp; b < c.tile_samples; b += wr.warps)
      for (int r = wr.lane; r < FD; r += wr.lanes) {
        Acc av = Acc(0), hv = Acc(0);
        if (b < nb) {
          const int64_t o = int64_t(b) * FD + r;
          // delta^L = G[L] (+ dLoss/dz); later layers' delta_in already holds both.
          const Acc d = a.delta_in == nullptr
                            ? cvt<Acc>(gs[b * srow + int64_t(L) * F + r / D]) +
                                  (gsum == nullptr ? Acc(0) : cvt<Acc>(gsum[o]))
                            : din[o];
          const Acc x0 = cvt<Acc>(h0g[o]);
          const Acc at = cvt<Acc>(msg[(int64_t(b) * L + (t - 1)) * FD + r]);
          av = d * x0;
          hv = t >= 2 ? x0 * cvt<Acc>(msg[(int64_t(b) * L + (t - 2)) * FD + r]) : x0;
          gh[o] = t == L ? d * at : gh[o] + d * at;
        }
        A[r * c.sample_stride + b] = av;
        Hp[r * c.sample_stride + b] = hv;
      }
  });
  exec([&](Team tm) {
    // delta^{t-1}: items (pair of i groups, sample block, e).
    const int n = (G + 1) / 2 * nbg * D;
    for (int k = tm.rank; k < n; k += tm.size) {
      const int e = k % D, bg = (k / D) % nbg, pair = k / (D * nbg);
      for (int half = 0; half < 2; ++half) {
        const int g = half == 0 ? pair : G - 1 - pair;
        if (half == 1 && g == pair) break;
        const int i0 = g * kJ;
        Acc acc[kB][kJ];
        zero(acc);
        rank1_steps<kB>(acc, A + (i0 * D + e) * c.sample_stride + bg * kB, D * c.sample_stride, Wt + (i0 * D + e) * c.weight_stride + i0,
                        D * c.weight_stride, F - i0);
        DAGFM_RB_UNROLL
        for (int ii = 0; ii < kJ; ++ii) {
          const int i = i0 + ii;
          if (i >= F) break;
          DAGFM_RB_UNROLL
          for (int b = 0; b < kB; ++b) {
            const int bb = bg * kB + b;
            if (bb >= nb) break;
            const int64_t o = int64_t(bb) * FD + int64_t(i) * D + e;
            Acc v = cvt<Acc>(gs[bb * srow + int64_t(t - 1) * F + i]) + acc[b][ii];
            if (gsum != nullptr) v += cvt<Acc>(gsum[o]);
            if (t >= 2)
              static_cast<Acc*>(a.delta_out)[b0 * FD + o] = v;
            else
              prm.grad_h0[b0 * FD + o] = cvt<T>(gh[o] + v);
          }
        }
      }
    }
    // dW: this thread's items (4x4 field block, e), summed over the tile's samples.
    InnerBwdLocal<Acc>& l = exec.local(mine, tm);
    const int ndw = bwd_block_pairs(F) * D;
    for (int m = 0; m < kBwdMaxItems; ++m) {
      const int k = tm.rank + m * tm.size;
      if (k >= ndw) break;
      const int e = k % D;
      int gi, gj;
      bwd_block_pair(k / D, G, gi, gj);
      const Acc* hrow[kJ];
      const Acc* arow[kJ];
      DAGFM_RB_UNROLL
      for (int u = 0; u < kJ; ++u) {  // rows past F read row F - 1: finite, never written out
        const int i = gi * kJ + u < F ? gi * kJ + u : F - 1;
        const int j = gj * kJ + u < F ? gj * kJ + u : F - 1;
        hrow[u] = Hp + (i * D + e) * c.sample_stride;
        arow[u] = A + (j * D + e) * c.sample_stride;
      }
      for (int b = 0; b < c.tile_samples; b += 4) {
        Acc hv[kJ][4], av[kJ][4];
        DAGFM_RB_UNROLL
        for (int u = 0; u < kJ; ++u) {
          load4(hrow[u] + b, hv[u]);
          load4(arow[u] + b, av[u]);
        }
        DAGFM_RB_UNROLL
        for (int ii = 0; ii < kJ; ++ii) {
          DAGFM_RB_UNROLL
          for (int jj = 0; jj < kJ; ++jj) {
            DAGFM_RB_UNROLL
            for (int v = 0; v < 4; ++v) l.dw[m][ii][jj] += hv[ii][v] * av[jj][v];
          }
        }
      }
    }
  });
}

// All tiles of one layer for one block, then the block's partial weight gradients of the layer.
template <typename T, typename Acc, typename Exec>
DAGFM_HD void inner_backward_block(const PropagateBackwardParams<T>& prm, const InnerBwdArgs& a,
                                   const RbConfig& c, int64_t block, int64_t num_blocks, Acc* smem,
                                   const Exec& exec) {
  const int F = prm.num_fields, D = prm.embed_dim, G = groups_of(F);
  InnerBwdLocal<Acc> mine;
  exec([&](Team tm) {
    stage_weights_by_target(prm.p + int64_t(a.t - 1) * F * F * D, smem + 2 * F * D * c.sample_stride, F, D, c, tm);
    InnerBwdLocal<Acc>& l = exec.local(mine, tm);
    for (int m = 0; m < kBwdMaxItems; ++m)
      for (int ii = 0; ii < kJ; ++ii)
        for (int jj = 0; jj < kJ; ++jj) l.dw[m][ii][jj] = Acc(0);
  });
  const int64_t tiles = ceil_div64(prm.batch, c.tile_samples);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    inner_backward_tile<T, Acc>(prm, a, c, smem, tile * c.tile_samples, exec, mine);
  exec([&](Team tm) {
    const InnerBwdLocal<Acc>& l = exec.local(mine, tm);
    Acc* part = static_cast<Acc*>(a.part) + block * a.part_block_numel +
                int64_t(a.t - 1) * num_edges(F) * D;
    const int ndw = bwd_block_pairs(F) * D;
    for (int m = 0; m < kBwdMaxItems; ++m) {
      const int k = tm.rank + m * tm.size;
      if (k >= ndw) break;
      const int e = k % D;
      int gi, gj;
      bwd_block_pair(k / D, G, gi, gj);
      for (int ii = 0; ii < kJ; ++ii)
        for (int jj = 0; jj < kJ; ++jj) {
          const int i = gi * kJ + ii, j = gj * kJ + jj;
          if (i <= j && j < F) part[(row_start(i, F) + (j - i)) * D + e] = l.dw[m][ii][jj];
        }
    }
  }, false);
}

#if defined(__CUDACC__)
template <typename T, typename Acc>
__global__ void __launch_bounds__(kMaxThreads)
    backward_inner(PropagateBackwardParams<T> prm, InnerBwdArgs a, RbConfig c) {
  inner_backward_block<T, Acc>(prm, a, c, blockIdx.x, gridDim.x, reinterpret_cast<Acc*>(dagfm_smem),
                               BlockExec{Team{int(threadIdx.x), int(blockDim.x)}});
}
#endif  // __CUDACC__

// Workspace of the inner backward: delta ping-pong and gh (3 x B*F*D), then the block partials.
DAGFM_HD int64_t backward_inner_part_offset(int64_t batch, int F, int D) {
  return 3 * batch * F * D;
}
DAGFM_HD int64_t backward_inner_part_block_numel(int F, int D, int L) {
  return int64_t(L) * num_edges(F) * D;
}
DAGFM_HD int64_t backward_inner_workspace_numel(int64_t batch, int F, int D, int L, int64_t grid) {
  return backward_inner_part_offset(batch, F, D) + grid * backward_inner_part_block_numel(F, D, L);
}

// One layer's arguments for the inner backward, pointing into that workspace.
template <typename Acc>
DAGFM_HD InnerBwdArgs inner_bwd_args(Acc* ws, int64_t batch, int F, int D, int L, int t) {
  const int64_t n = batch * F * D;
  InnerBwdArgs a;
  a.t = t;
  a.delta_in = t == L ? nullptr : ws + ((t + 1) % 2) * n;  // written by layer t + 1
  a.delta_out = ws + (t % 2) * n;
  a.gh = ws + 2 * n;
  a.part = ws + backward_inner_part_offset(batch, F, D);
  a.part_block_numel = backward_inner_part_block_numel(F, D, L);
  return a;
}

}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
