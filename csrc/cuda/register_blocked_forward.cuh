// Register-blocked CUDA-core forward of the inner and outer interactions (namespace rb; the
// shared layout and microkernel are in register_blocked.cuh). No torch includes.
//
// The three products of the two interactions all have the rank-1 shape (x: kB consecutive
// samples, y: 4 consecutive values):
//   inner        a[b, j, e] += h[b, i, e] * p[i, j, e]   over i;  thread: (samples, 4 j, one e)
//   outer, c     c[b, i, j] += h[b, i, d] * p[i, j, d]   over d;  thread: (samples, 4 j, one i)
//   outer, a     a[b, j, e] += c[b, i, j] * q[i, j, e]   over i;  thread: (samples, one j, 4 e)
// Shared memory per block (Acc elements):
//   S0, S1  (F, D, sample_stride)            h^{t-1} and a^t then h^t of the tile, samples innermost
//   W       (rows, D, weight_stride)         p of the chunk's rows, j innermost (4 consecutive j: one vector)
//   Q       (rows, F, padded_dim)            q of the chunk's rows (outer)
//   C       (rows, padded_fields, sample_stride)  c of the chunk's rows (outer)
// A layer's weights are staged in chunks of `rows_per_chunk` rows; the first chunk stores the
// sums, later chunks add to them, and the chunk that completes an output multiplies it by h0 (read
// again from global memory, an L2 hit).
#pragma once

#include <cstdint>

#include "register_blocked.cuh"

namespace dagfm {
namespace cuda {
namespace rb {

DAGFM_HD int row_numel(const RbConfig& c, int F, int D, bool outer) {
  return D * c.weight_stride + (outer ? F * c.padded_dim + c.padded_fields * c.sample_stride : 0);
}

// Threads a block uses: the largest work-item count of its phases, in whole warps, capped.
DAGFM_HD int block_threads(Interaction kind, const RbConfig& c, int F, int D) {
  const int nbg = c.tile_samples / c.samples_per_thread;
  const int G = groups_of(F);
  int items;
  if (kind == Interaction::Inner) {
    items = (G + 1) / 2 * nbg * D;  // (pair of j groups, sample block, e)
  } else {
    const int a = c.rows_per_chunk * G * nbg;  // (row, j group, sample block)
    const int b = F * nbg * groups_of(D);      // (j, sample block, e group)
    items = a > b ? a : b;
  }
  int t = (items + 31) / 32 * 32;
  return t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t);
}

// Tile size: the largest of kTiles that still gives every multiprocessor a tile (small batches get
// small tiles) and fits shared memory with at least one weight row per chunk; `force_tb` (> 0)
// pins it (tuning runs). Chunks are evened out: the same count, the fewest rows that need it.
// Inner or outer only (the kernel interaction has its own layout; rb::plan_forward picks).
inline RbPlan plan_forward_inner_outer(Interaction kind, int64_t batch, int F, int D, int acc_size,
                                       const DeviceLimits& lim, int force_tb = 0) {
  RbPlan plan;
  if (F < 1 || D < 1 || acc_size <= 0 || kind == Interaction::Kernel) return plan;
  const bool outer = kind == Interaction::Outer;
  const int64_t budget = lim.smem_optin / acc_size;
  for (int tb : kTiles) {
    if (!tile_allowed(tb, batch, lim, force_tb)) continue;
    RbConfig c = tile_config(tb, tb >= 16 ? 8 : 4);
    c.padded_fields = groups_of(F) * kJ;
    c.weight_stride = pad_stride(c.padded_fields);
    c.padded_dim = pad_stride(D);
    const int64_t fixed = 2 * int64_t(F) * D * c.sample_stride;
    const int64_t per_row = row_numel(c, F, D, outer);
    if (fixed + per_row > budget) continue;
    int64_t rows = (budget - fixed) / per_row;
    if (rows > F) rows = F;
    const int64_t chunks = ceil_div64(F, rows);
    c.rows_per_chunk = int(ceil_div64(F, chunks));
    plan.cfg = c;
    plan.threads = block_threads(kind, c, F, D);
    plan.smem_bytes = (fixed + int64_t(c.rows_per_chunk) * per_row) * acc_size;
    plan.ok = true;
    return plan;
  }
  return plan;
}

// W[ir, e, jj] = p[i0 + ir, jj, e] on the upper triangle (jj >= i, jj < F), else 0, for jj < padded_fields.
// Rows (ir, e), columns jj: shared-memory stores are consecutive; the global loads stride by D
// (the lines are reused from L1 by the next rows).
template <typename T, typename Acc>
DAGFM_HD void stage_weights_transposed(const T* DAGFM_RESTRICT p, Acc* DAGFM_RESTRICT w, int i0,
                                       int rows, int F, int D, const RbConfig& c, Team team) {
  const WarpRows wr = warp_rows(team);
  const int nrows = rows * D;
  for (int r0 = wr.warp; r0 < nrows; r0 += wr.warps * kBatch) {
    Acc v[kBatch][2];
    DAGFM_RB_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      const int r = r0 + u * wr.warps;
      const int ir = r / D, e = r % D, i = i0 + ir;
      const T* src = p + int64_t(i) * F * D + e;
      DAGFM_RB_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int jj = wr.lane + h * wr.lanes;
        v[u][h] = (r < nrows && jj >= i && jj < F) ? cvt<Acc>(src[int64_t(jj) * D]) : Acc(0);
      }
    }
    DAGFM_RB_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      const int r = r0 + u * wr.warps;
      if (r >= nrows) break;
      Acc* dst = w + r * c.weight_stride;
      DAGFM_RB_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int jj = wr.lane + h * wr.lanes;
        if (jj < c.padded_fields) dst[jj] = v[u][h];
      }
      // Columns past two sweeps (padded_fields > 2 * lanes: F > 64 on a GPU, any F on the host).
      const int64_t i = i0 + r / D;
      const T* src = p + i * F * D + r % D;
      for (int jj = wr.lane + 2 * wr.lanes; jj < c.padded_fields; jj += wr.lanes)
        dst[jj] = (jj >= i && jj < F) ? cvt<Acc>(src[int64_t(jj) * D]) : Acc(0);
    }
  }
}

// Q[ir, j, e] = q[i0 + ir, j, e] for j >= i and e < D, else 0, for e < padded_dim. Rows (ir, j), columns e:
// consecutive on both sides.
template <typename T, typename Acc>
DAGFM_HD void stage_q(const T* DAGFM_RESTRICT q, Acc* DAGFM_RESTRICT qs, int i0, int rows, int F,
                      int D, const RbConfig& c, Team team) {
  const WarpRows wr = warp_rows(team);
  const int nrows = rows * F;
  for (int r0 = wr.warp; r0 < nrows; r0 += wr.warps * kBatch) {
    Acc v[kBatch];
    DAGFM_RB_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      const int r = r0 + u * wr.warps;
      const int i = i0 + r / F, j = r % F;
      v[u] = (r < nrows && j >= i && wr.lane < D) ? cvt<Acc>(q[(int64_t(i) * F + j) * D + wr.lane])
                                                 : Acc(0);
    }
    DAGFM_RB_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      const int r = r0 + u * wr.warps;
      if (r >= nrows) break;
      const int i = i0 + r / F, j = r % F;
      Acc* dst = qs + r * c.padded_dim;
      if (wr.lane < c.padded_dim) dst[wr.lane] = v[u];
      for (int e = wr.lane + wr.lanes; e < c.padded_dim; e += wr.lanes)  // D > 32, or the host
        dst[e] = (j >= i && e < D) ? cvt<Acc>(q[(int64_t(i) * F + j) * D + e]) : Acc(0);
    }
  }
}

// Inner: a[b, j, e] over the chunk's rows [i0, i1). Thread items (pair of j groups, sample block,
// e); a pair is groups g and G-1-g, so every item does about the same work on the triangle.
template <int kB, typename T, typename Acc>
DAGFM_HD void inner_chunk(const Acc* DAGFM_RESTRICT sprev, Acc* DAGFM_RESTRICT snext,
                          const Acc* DAGFM_RESTRICT w, const T* DAGFM_RESTRICT h0g, MsgOut<T> msg,
                          int nb, int i0, int i1, int F, int D, const RbConfig& c, Team team) {
  const int G = groups_of(F);
  const int nbg = c.tile_samples / kB;
  const int64_t FD = int64_t(F) * D;
  const int n = (G + 1) / 2 * nbg * D;
  for (int k = team.rank; k < n; k += team.size) {
    const int e = k % D;
    const int bg = (k / D) % nbg;
    const int pair = k / (D * nbg);
    for (int half = 0; half < 2; ++half) {
      const int g = half == 0 ? pair : G - 1 - pair;
      if (half == 1 && g == pair) break;
      const int j0 = g * kJ;
      if (j0 + kJ - 1 < i0) continue;  // finished in an earlier chunk
      const int iend = i1 < j0 + kJ ? i1 : j0 + kJ;
      Acc acc[kB][kJ];
      zero(acc);
      rank1_steps<kB>(acc, sprev + (i0 * D + e) * c.sample_stride + bg * kB, D * c.sample_stride, w + e * c.weight_stride + j0,
                      D * c.weight_stride, iend - i0);
      const bool first = i0 == 0;
      const bool last = i1 >= (F < j0 + kJ ? F : j0 + kJ);
      DAGFM_RB_UNROLL
      for (int jj = 0; jj < kJ; ++jj) {
        const int j = j0 + jj;
        if (j >= F) break;
        Acc col[kB];
        DAGFM_RB_UNROLL
        for (int b = 0; b < kB; ++b) col[b] = acc[b][jj];
        store_samples<kB>(snext + (j * D + e) * c.sample_stride + bg * kB, col, first, last,
                          h0g + bg * kB * FD + int64_t(j) * D + e, FD, nb - bg * kB,
                          offset(msg, bg * kB, j * D + e));
      }
    }
  }
}

// Outer, first product: C[ir, j, b] = <p[i, j, :], h[b, i, :]> for the chunk's rows. Items (j
// group, sample block, row); groups entirely below the diagonal are skipped.
template <int kB, typename Acc>
DAGFM_HD void outer_c_chunk(const Acc* DAGFM_RESTRICT sprev, const Acc* DAGFM_RESTRICT w,
                            Acc* DAGFM_RESTRICT cbuf, int i0, int rows, int F, int D,
                            const RbConfig& c, Team team) {
  const int G = groups_of(F);
  const int nbg = c.tile_samples / kB;
  const int n = rows * G * nbg;
  for (int k = team.rank; k < n; k += team.size) {
    const int g = k % G;
    const int bg = (k / G) % nbg;
    const int ir = k / (G * nbg);
    const int i = i0 + ir;
    const int j0 = g * kJ;
    if (j0 + kJ - 1 < i) continue;
    Acc acc[kB][kJ];
    zero(acc);
    rank1_steps<kB>(acc, sprev + i * D * c.sample_stride + bg * kB, c.sample_stride, w + ir * D * c.weight_stride + j0, c.weight_stride, D);
    DAGFM_RB_UNROLL
    for (int jj = 0; jj < kJ; ++jj) {
      Acc* dst = cbuf + (ir * c.padded_fields + j0 + jj) * c.sample_stride + bg * kB;
      DAGFM_RB_UNROLL
      for (int v = 0; v < kB; v += 4) {
        const Acc out[4] = {acc[v][jj], acc[v + 1][jj], acc[v + 2][jj], acc[v + 3][jj]};
        store4(dst + v, out);
      }
    }
  }
}

// Outer, second product: a[b, j, e] += sum_{i in chunk, i <= j} C[ir, j, b] * Q[ir, j, e]. Items
// (e group, sample block, j). When every item has a thread of its own, its sums stay in that
// thread's registers (`keep`) across the chunks and are stored once, by the chunk that completes
// them; otherwise each chunk adds its part to snext.
template <int kB, typename Acc>
struct OuterLocal {
  Acc acc[kB][kJ];
};

template <int kB, typename T, typename Acc>
DAGFM_HD void store_outer_item(const Acc (&acc)[kB][kJ], Acc* DAGFM_RESTRICT snext,
                               const T* DAGFM_RESTRICT h0g, MsgOut<T> msg, bool first, bool last,
                               int j, int eg, int bg, int nb, int F, int D, const RbConfig& c) {
  const int64_t FD = int64_t(F) * D;
  DAGFM_RB_UNROLL
  for (int ee = 0; ee < kJ; ++ee) {
    const int e = eg * kJ + ee;
    if (e >= D) break;
    Acc col[kB];
    DAGFM_RB_UNROLL
    for (int b = 0; b < kB; ++b) col[b] = acc[b][ee];
    store_samples<kB>(snext + (j * D + e) * c.sample_stride + bg * kB, col, first, last,
                      h0g + bg * kB * FD + int64_t(j) * D + e, FD, nb - bg * kB,
                      offset(msg, bg * kB, j * D + e));
  }
}

template <int kB, typename T, typename Acc>
DAGFM_HD void outer_a_chunk(const Acc* DAGFM_RESTRICT cbuf, const Acc* DAGFM_RESTRICT qs,
                            Acc* DAGFM_RESTRICT snext, const T* DAGFM_RESTRICT h0g, MsgOut<T> msg,
                            int nb, int i0, int i1, int F, int D, const RbConfig& c, Team team,
                            OuterLocal<kB, Acc>& keep) {
  const int DG = groups_of(D);
  const int nbg = c.tile_samples / kB;
  const int n = F * nbg * DG;
  const bool resident = n <= team.size;
  for (int k = team.rank; k < n; k += team.size) {
    const int eg = k % DG;
    const int bg = (k / DG) % nbg;
    const int j = k / (DG * nbg);
    if (j < i0) continue;  // finished in an earlier chunk
    const int iend = i1 < j + 1 ? i1 : j + 1;
    const Acc* x = cbuf + j * c.sample_stride + bg * kB;
    const Acc* y = qs + j * c.padded_dim + eg * kJ;
    if (resident) {
      if (i0 == 0) zero(keep.acc);
      rank1_steps<kB>(keep.acc, x, c.padded_fields * c.sample_stride, y, F * c.padded_dim, iend - i0);
      if (i1 > j) store_outer_item<kB>(keep.acc, snext, h0g, msg, true, true, j, eg, bg, nb, F, D, c);
    } else {
      Acc acc[kB][kJ];
      zero(acc);
      rank1_steps<kB>(acc, x, c.padded_fields * c.sample_stride, y, F * c.padded_dim, iend - i0);
      store_outer_item<kB>(acc, snext, h0g, msg, i0 == 0, i1 > j, j, eg, bg, nb, F, D, c);
    }
  }
}

// Every layer for the tile starting at sample b0; writes states[b0 .. b0 + nb) once.
template <Interaction K, int kB, typename T, typename Acc, typename Exec>
DAGFM_HD void forward_tile(const PropagateParams<T>& prm, const RbConfig& c, Acc* smem, int64_t b0,
                           const Exec& exec, OuterLocal<kB, Acc>& mine) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  const int FD = F * D;
  const int nb = int(imin64(c.tile_samples, prm.batch - b0));
  Acc* sprev = smem;
  Acc* snext = smem + state_numel(c, F, D);
  Acc* w = snext + state_numel(c, F, D);
  Acc* qs = w + c.rows_per_chunk * D * c.weight_stride;
  Acc* cbuf = qs + c.rows_per_chunk * F * c.padded_dim;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  T* DAGFM_RESTRICT st = prm.states + b0 * int64_t(L + 1) * F;

  // h^0, samples innermost; padding samples are zero (and stay zero through every layer).
  exec([&](Team tm) { load_tile(h0g, sprev, nb, FD, c, tm); });
  exec([&](Team tm) { write_state_sums(sprev, st, 0, nb, F, D, L, c.sample_stride, tm); }, false);
  for (int t = 1; t <= L; ++t) {
    const T* p = prm.p + int64_t(t - 1) * F * FD;
    const T* q = K == Interaction::Outer ? prm.q + int64_t(t - 1) * F * FD : nullptr;
    for (int i0 = 0; i0 < F; i0 += c.rows_per_chunk) {
      const int i1 = i0 + c.rows_per_chunk < F ? i0 + c.rows_per_chunk : F;
      exec([&](Team tm) {
        stage_weights_transposed(p, w, i0, i1 - i0, F, D, c, tm);
        if (K == Interaction::Outer) stage_q(q, qs, i0, i1 - i0, F, D, c, tm);
      });
      const MsgOut<T> msg = layer_messages(prm, b0, t);
      if (K == Interaction::Inner) {
        exec([&](Team tm) { inner_chunk<kB>(sprev, snext, w, h0g, msg, nb, i0, i1, F, D, c, tm); });
      } else {
        exec([&](Team tm) { outer_c_chunk<kB>(sprev, w, cbuf, i0, i1 - i0, F, D, c, tm); });
        exec([&](Team tm) {
          outer_a_chunk<kB>(cbuf, qs, snext, h0g, msg, nb, i0, i1, F, D, c, tm, exec.local(mine, tm));
        });
      }
      // (that barrier also frees W, Q and C for the next chunk's staging)
    }
    exec([&](Team tm) { write_state_sums(snext, st, t, nb, F, D, L, c.sample_stride, tm); }, false);
    Acc* tmp = sprev;
    sprev = snext;
    snext = tmp;
  }
  exec([](Team) {});  // a barrier: the next tile overwrites S0
}

// Tiles go to blocks round-robin (a persistent grid); the host test calls this per block id.
template <Interaction K, int kB, typename T, typename Acc, typename Exec>
DAGFM_HD void forward_block(const PropagateParams<T>& prm, const RbConfig& c, int64_t block,
                            int64_t num_blocks, Acc* smem, const Exec& exec) {
  OuterLocal<kB, Acc> mine;  // a thread's own (on the host test: a stand-in, see Exec::local)
  const int64_t tiles = ceil_div64(prm.batch, c.tile_samples);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    forward_tile<K, kB, T, Acc>(prm, c, smem, tile * c.tile_samples, exec, mine);
}

#if defined(__CUDACC__)
template <Interaction K, int kB, typename T, typename Acc>
__global__ void __launch_bounds__(kMaxThreads) forward_inner_outer(PropagateParams<T> prm, RbConfig c) {
  forward_block<K, kB, T, Acc>(prm, c, blockIdx.x, gridDim.x, reinterpret_cast<Acc*>(dagfm_smem),
                               BlockExec{Team{int(threadIdx.x), int(blockDim.x)}});
}
#endif  // __CUDACC__

}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
