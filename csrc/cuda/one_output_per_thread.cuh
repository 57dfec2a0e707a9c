// The one-output-per-thread CUDA-core algorithm (namespace one_output): every interaction, dtype
// and shape, forward and backward. It is the path that always applies (docs/cuda.md says when the
// faster ones take over). No torch includes: plain nvcc compiles it in seconds
// (scripts/check_cuda_compile.sh), and the host compiler runs its tile arithmetic in
// tests/cuda_host/tile_host_test.cpp.
//
// One block owns a tile of `tile_b` samples at a time and runs every layer for it. The tile's
// states live in "tile buffers": shared memory on the fast path, a per-block slice of a global
// workspace on the fallback path (shapes whose states or weight rows do not fit on chip). The
// arithmetic below is written as team loops (`for k = rank; k < n; k += size`) separated by
// team_sync(), so the same functions also run on the host with a team of one thread.
//
// Weights are visited by row chunks: rows i0..i1-1 of the upper triangle (edges (i, j), j >= i)
// are contiguous in memory, so a chunk is staged with plain contiguous copies. Forward messages
// for a_j accumulate over the chunks; in the backward a chunk holds every edge leaving its rows,
// so delta^{t-1}_i of those rows is finished inside the chunk.
//
// Weight gradients: each block sums its tiles' contributions into its own slice of a workspace
// (packed upper triangle, row-major), then reduce_weight_grad_kernel adds the slices in block
// order. No float atomics: the result depends only on the batch, the shapes and the grid size.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "weight_grad_reduce.cuh"

namespace dagfm {
namespace cuda {
namespace one_output {

constexpr int kThreads = 256;  // threads per block for every kernel here
constexpr int kMaxTileB = 8;   // samples per tile, at most

template <Interaction K>
DAGFM_HD int64_t edge_elems(int D) {
  return K == Interaction::Kernel ? int64_t(D) * D : int64_t(D);
}

// How a block lays out one tile. Filled by plan_launch on the host.
struct TileConfig {
  int tile_b = 1;           // samples per tile
  int nslots = 0;           // (tile_b, F, D) Acc buffers per tile
  int nscratch = 0;         // (tile_b, chunk_edges) Acc buffers (outer: per-edge dot products)
  int64_t chunk_edges = 0;  // edges per weight chunk (staged), or all edges (not staged)
  bool staged = false;      // true: buffers and weight chunks in shared memory
};

// Acc elements of one tile's buffers (slots then scratch).
DAGFM_HD int64_t tile_acc_numel(const TileConfig& cfg, int F, int D) {
  return (int64_t(cfg.nslots) * F * D + int64_t(cfg.nscratch) * cfg.chunk_edges) * cfg.tile_b;
}

// Last row (exclusive) of the chunk starting at row i0. The plan guarantees chunk_edges >= F,
// so at least one row always fits.
DAGFM_HD int chunk_end(int i0, int F, int64_t chunk_edges, bool staged) {
  if (!staged) return F;
  const int64_t base = row_start(i0, F);
  int i1 = i0 + 1;
  while (i1 < F && row_start(i1 + 1, F) - base <= chunk_edges) ++i1;
  return i1;
}

// Address of edge (i, j)'s weights: packed chunk in shared memory, or the full (F, F, ...) layer.
template <typename T>
struct RowView {
  const T* w;
  int F;
  int64_t elems;    // weights per edge
  int64_t base_rs;  // row_start of the chunk's first row (packed only)
  bool packed;
  DAGFM_HD const T* edge(int i, int j) const {
    const int64_t e = packed ? row_start(i, F) - base_rs + (j - i) : int64_t(i) * F + j;
    return w + e * elems;
  }
};

// Copies rows i0..i1-1 of one layer's upper triangle into dst (packed, row-major).
template <typename T>
DAGFM_HD void stage_rows(const T* DAGFM_RESTRICT layer, T* DAGFM_RESTRICT dst, int i0, int i1, int F,
                         int64_t elems, Team team) {
  int64_t out = 0;
  for (int i = i0; i < i1; ++i) {
    const T* DAGFM_RESTRICT row = layer + (int64_t(i) * F + i) * elems;  // edges (i, i..F-1)
    const int64_t n = int64_t(F - i) * elems;
    for (int64_t k = team.rank; k < n; k += team.size) dst[out + k] = row[k];
    out += n;
  }
}

template <typename T>
struct ChunkViews {
  RowView<T> p, q;
};

// Stages chunk [i0, i1) when the plan says so and returns views of p (and q) for it.
template <Interaction K, typename T>
DAGFM_HD ChunkViews<T> chunk_views(const T* p, const T* q, T* wbuf, int i0, int i1, int F, int D,
                                   const TileConfig& cfg, Team team) {
  const int64_t elems = edge_elems<K>(D);
  const int64_t rs0 = row_start(i0, F);
  if (!cfg.staged)
    return ChunkViews<T>{RowView<T>{p, F, elems, rs0, false}, RowView<T>{q, F, int64_t(D), rs0, false}};
  const int64_t n = row_start(i1, F) - rs0;
  stage_rows(p, wbuf, i0, i1, F, elems, team);
  if (K == Interaction::Outer) stage_rows(q, wbuf + n * elems, i0, i1, F, int64_t(D), team);
  team_sync();
  return ChunkViews<T>{RowView<T>{wbuf, F, elems, rs0, true},
                       RowView<T>{wbuf + n * elems, F, int64_t(D), rs0, true}};
}

// acc_out[b, j, :] += a_j for one layer: sum over i <= j of the message i -> j (the caller zeroes
// acc_out first). hprev holds h^{t-1}. Ends with team_sync().
template <Interaction K, typename T, typename Acc>
DAGFM_HD void layer_accumulate_tile(const T* p, const T* q, const Acc* DAGFM_RESTRICT hprev,
                                    Acc* DAGFM_RESTRICT acc_out, Acc* DAGFM_RESTRICT scratch, T* wbuf,
                                    int nb, int F, int D, const TileConfig& cfg, Team team) {
  const int64_t FD = int64_t(F) * D;
  const int64_t cap = cfg.chunk_edges;
  for (int i0 = 0; i0 < F;) {
    const int i1 = chunk_end(i0, F, cap, cfg.staged);
    const int64_t rs0 = row_start(i0, F);
    const ChunkViews<T> views = chunk_views<K>(p, q, wbuf, i0, i1, F, D, cfg, team);
    const RowView<T>& wp = views.p;
    const RowView<T>& wq = views.q;
    if (K == Interaction::Outer) {
      // c[b, edge] = <p_ij, h_i>, shared by the D outputs of a_j. Lower-triangle slots idle.
      const int rows = i1 - i0;
      const int64_t n = int64_t(nb) * rows * F;
      for (int64_t k = team.rank; k < n; k += team.size) {
        const int j = int(k % F);
        const int64_t r = k / F;
        const int i = i0 + int(r % rows);
        const int64_t b = r / rows;
        if (j < i) continue;
        scratch[b * cap + row_start(i, F) - rs0 + (j - i)] =
            dot_cvt<Acc>(wp.edge(i, j), hprev + b * FD + int64_t(i) * D, D);
      }
      team_sync();
    }
    // One thread per output (b, j, e); only targets j >= i0 receive messages from this chunk.
    const int cols = F - i0;
    const int64_t n = int64_t(nb) * cols * D;
    for (int64_t k = team.rank; k < n; k += team.size) {
      const int e = int(k % D);
      const int64_t r = k / D;
      const int j = i0 + int(r % cols);
      const int64_t b = r / cols;
      const Acc* DAGFM_RESTRICT hb = hprev + b * FD;
      const int imax = j < i1 - 1 ? j : i1 - 1;
      Acc s = Acc(0);
      for (int i = i0; i <= imax; ++i) {
        if (K == Interaction::Inner) {
          s += cvt<Acc>(wp.edge(i, j)[e]) * hb[int64_t(i) * D + e];
        } else if (K == Interaction::Outer) {
          s += scratch[b * cap + row_start(i, F) - rs0 + (j - i)] * cvt<Acc>(wq.edge(i, j)[e]);
        } else {
          const T* DAGFM_RESTRICT w = wp.edge(i, j) + e;  // W[i, j, d, e], stride D over d
          const Acc* DAGFM_RESTRICT hi = hb + int64_t(i) * D;
          for (int d = 0; d < D; ++d) s += hi[d] * cvt<Acc>(w[int64_t(d) * D]);
        }
      }
      acc_out[b * FD + int64_t(j) * D + e] += s;
    }
    team_sync();  // the next chunk overwrites wbuf and scratch
    i0 = i1;
  }
}

// Forward for the tile starting at sample b0. Slots: h0, then two buffers that alternate as
// h^{t-1} and h^t; scratch after them. Writes states[b0.., :, :] once.
template <Interaction K, typename T, typename Acc>
DAGFM_HD void forward_tile(const PropagateParams<T>& prm, const TileConfig& cfg, Acc* base, T* wbuf,
                           int64_t b0, Team team) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  const int64_t FD = int64_t(F) * D;
  const int64_t S = int64_t(cfg.tile_b) * FD;
  const int nb = int(imin64(cfg.tile_b, prm.batch - b0));
  const int64_t layer_numel = F * FD * (K == Interaction::Kernel ? D : 1);
  const int64_t q_layer_numel = F * FD;
  Acc* h0s = base;
  Acc* const buf_odd = base + S;  // h^t for odd t (scalars, not an array: no local memory)
  Acc* const buf_even = base + 2 * S;
  Acc* scratch = base + 3 * S;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  T* DAGFM_RESTRICT st = prm.states + b0 * (L + 1) * F;
  const int64_t sample_states = int64_t(L + 1) * F;

  const int64_t n = int64_t(nb) * FD;
  for (int64_t k = team.rank; k < n; k += team.size) {
    h0s[k] = cvt<Acc>(h0g[k]);
    buf_odd[k] = Acc(0);
    buf_even[k] = Acc(0);
  }
  team_sync();
  for (int64_t k = team.rank; k < int64_t(nb) * F; k += team.size) {
    const int64_t b = k / F;
    const int j = int(k % F);
    st[b * sample_states + j] = cvt<T>(sum(h0s + b * FD + int64_t(j) * D, D));
  }
  const Acc* hprev = h0s;
  for (int t = 1; t <= L; ++t) {
    Acc* hnext = (t & 1) ? buf_odd : buf_even;
    Acc* clear = (t & 1) ? buf_even : buf_odd;  // h^{t-1} (t >= 2): free once a^t is summed
    layer_accumulate_tile<K, T, Acc>(prm.p + (t - 1) * layer_numel,
                                     prm.q == nullptr ? nullptr : prm.q + (t - 1) * q_layer_numel,
                                     hprev, hnext, scratch, wbuf, nb, F, D, cfg, team);
    // h^t = h0 * a^t, its state sums, and a zeroed buffer for the next layer's sums; a^t kept
    // for the backward when asked.
    T* DAGFM_RESTRICT msg =
        prm.messages == nullptr ? nullptr : prm.messages + (b0 * L + (t - 1)) * FD;
    for (int64_t k = team.rank; k < int64_t(nb) * F; k += team.size) {
      const int64_t b = k / F;
      const int j = int(k % F);
      const int64_t off = b * FD + int64_t(j) * D;
      Acc s = Acc(0);
      for (int d = 0; d < D; ++d) {
        if (msg != nullptr) msg[b * L * FD + int64_t(j) * D + d] = cvt<T>(hnext[off + d]);
        const Acc v = h0s[off + d] * hnext[off + d];
        hnext[off + d] = v;
        s += v;
        clear[off + d] = Acc(0);
      }
      st[b * sample_states + int64_t(t) * F + j] = cvt<T>(s);
    }
    team_sync();
    hprev = hnext;
  }
  team_sync();  // the next tile overwrites every buffer
}

// Backward of one layer for the tile: writes delta^{t-1} (dprev) and adds this tile's weight
// gradients for the layer into part_p / part_q (assigns when `first`). alpha = delta^t * h0.
// gs_prev points at grad_states[b0, t-1, 0] (sample stride gs_stride); gsum (or nullptr) at
// grad_sum[b0] (sample stride F*D), added to every delta. Ends with team_sync().
template <Interaction K, typename T, typename Acc>
DAGFM_HD void layer_backward_tile(const T* p, const T* q, const Acc* DAGFM_RESTRICT hprev,
                                  const Acc* DAGFM_RESTRICT alpha, const T* DAGFM_RESTRICT gs_prev,
                                  int64_t gs_stride, const T* DAGFM_RESTRICT gsum,
                                  Acc* DAGFM_RESTRICT dprev,
                                  Acc* DAGFM_RESTRICT scratch, T* wbuf, Acc* DAGFM_RESTRICT part_p,
                                  Acc* DAGFM_RESTRICT part_q, bool first, int nb, int F, int D,
                                  const TileConfig& cfg, Team team) {
  const int64_t FD = int64_t(F) * D;
  const int64_t cap = cfg.chunk_edges;
  const int64_t elems = edge_elems<K>(D);
  Acc* sc = scratch;                              // c[b, edge] = <p_ij, h_i>      (outer)
  Acc* sr = scratch + int64_t(cfg.tile_b) * cap;  // r[b, edge] = <q_ij, alpha_j>  (outer)
  for (int i0 = 0; i0 < F;) {
    const int i1 = chunk_end(i0, F, cap, cfg.staged);
    const int rows = i1 - i0;
    const int64_t rs0 = row_start(i0, F);
    const ChunkViews<T> views = chunk_views<K>(p, q, wbuf, i0, i1, F, D, cfg, team);
    const RowView<T>& wp = views.p;
    const RowView<T>& wq = views.q;
    if (K == Interaction::Outer) {
      const int64_t n = int64_t(nb) * rows * F;
      for (int64_t k = team.rank; k < n; k += team.size) {
        const int j = int(k % F);
        const int64_t r = k / F;
        const int i = i0 + int(r % rows);
        const int64_t b = r / rows;
        if (j < i) continue;
        const int64_t le = b * cap + row_start(i, F) - rs0 + (j - i);
        sc[le] = dot_cvt<Acc>(wp.edge(i, j), hprev + b * FD + int64_t(i) * D, D);
        sr[le] = dot_cvt<Acc>(wq.edge(i, j), alpha + b * FD + int64_t(j) * D, D);
      }
      team_sync();
    }
    // delta^{t-1}_i = G[t-1, i] + sum_{j >= i} d(message i -> j)/dh_i . alpha_j
    {
      const int64_t n = int64_t(nb) * rows * D;
      for (int64_t k = team.rank; k < n; k += team.size) {
        const int d = int(k % D);
        const int64_t r = k / D;
        const int i = i0 + int(r % rows);
        const int64_t b = r / rows;
        const Acc* DAGFM_RESTRICT ab = alpha + b * FD;
        Acc s = Acc(0);
        for (int j = i; j < F; ++j) {
          if (K == Interaction::Inner) {
            s += cvt<Acc>(wp.edge(i, j)[d]) * ab[int64_t(j) * D + d];
          } else if (K == Interaction::Outer) {
            s += sr[b * cap + row_start(i, F) - rs0 + (j - i)] * cvt<Acc>(wp.edge(i, j)[d]);
          } else {
            const T* DAGFM_RESTRICT w = wp.edge(i, j) + int64_t(d) * D;
            const Acc* DAGFM_RESTRICT aj = ab + int64_t(j) * D;
            for (int e = 0; e < D; ++e) s += cvt<Acc>(w[e]) * aj[e];
          }
        }
        const int64_t o = b * FD + int64_t(i) * D + d;
        if (gsum != nullptr) s += cvt<Acc>(gsum[o]);
        dprev[o] = cvt<Acc>(gs_prev[b * gs_stride + i]) + s;
      }
    }
    // This tile's weight gradients for the chunk's edges, samples summed in order. One row at a
    // time so the workspace writes are contiguous.
    for (int i = i0; i < i1; ++i) {
      const int64_t n = int64_t(F - i) * elems;
      const int64_t row_off = row_start(i, F) * elems;
      for (int64_t k = team.rank; k < n; k += team.size) {
        const int j = i + int(k / elems);
        const int x = int(k % elems);
        Acc g = Acc(0);
        if (K == Interaction::Inner) {
          for (int b = 0; b < nb; ++b)
            g += alpha[b * FD + int64_t(j) * D + x] * hprev[b * FD + int64_t(i) * D + x];
        } else if (K == Interaction::Outer) {
          const int64_t le = row_start(i, F) - rs0 + (j - i);
          Acc gq = Acc(0);
          for (int b = 0; b < nb; ++b) {
            g += sr[b * cap + le] * hprev[b * FD + int64_t(i) * D + x];
            gq += sc[b * cap + le] * alpha[b * FD + int64_t(j) * D + x];
          }
          part_q[row_off + k] = first ? gq : part_q[row_off + k] + gq;
        } else {
          const int d = x / D, e = x % D;
          for (int b = 0; b < nb; ++b)
            g += hprev[b * FD + int64_t(i) * D + d] * alpha[b * FD + int64_t(j) * D + e];
        }
        part_p[row_off + k] = first ? g : part_p[row_off + k] + g;
      }
    }
    team_sync();  // the next chunk overwrites wbuf and scratch
    i0 = i1;
  }
}

// Backward for the tile starting at b0. Slots: h0, a^1..a^L, hbuf (h^{t-1}), delta, dprev, gh0.
// a^t comes from the training forward's saved messages, or the forward is recomputed on chip
// (h^t = h0 * a^t is cheap to rebuild, a^t is not recoverable from h^t). part_p / part_q: this
// block's (L, edges, ...) gradient slices.
template <Interaction K, typename T, typename Acc>
DAGFM_HD void backward_tile(const PropagateBackwardParams<T>& prm, const TileConfig& cfg, Acc* base,
                            T* wbuf, Acc* part_p, Acc* part_q, bool first, int64_t b0, Team team) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  const int64_t FD = int64_t(F) * D;
  const int64_t S = int64_t(cfg.tile_b) * FD;
  const int nb = int(imin64(cfg.tile_b, prm.batch - b0));
  const int64_t layer_numel = F * FD * (K == Interaction::Kernel ? D : 1);
  const int64_t q_layer_numel = F * FD;
  const int64_t part_layer = num_edges(F) * edge_elems<K>(D);
  const int64_t part_q_layer = num_edges(F) * D;
  Acc* h0s = base;
  Acc* hbuf = base + int64_t(L + 1) * S;
  Acc* delta = base + int64_t(L + 2) * S;
  Acc* dprev = base + int64_t(L + 3) * S;
  Acc* gh0 = base + int64_t(L + 4) * S;
  Acc* scratch = base + int64_t(L + 5) * S;
  auto a = [&](int t) { return base + int64_t(t) * S; };
  const int64_t sample_states = int64_t(L + 1) * F;
  const T* DAGFM_RESTRICT gs = prm.grad_states + b0 * sample_states;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  const T* DAGFM_RESTRICT gsum = prm.grad_sum == nullptr ? nullptr : prm.grad_sum + b0 * FD;
  const int64_t n = int64_t(nb) * FD;

  const T* DAGFM_RESTRICT saved =
      prm.saved_messages == nullptr ? nullptr : prm.saved_messages + b0 * L * FD;
  for (int64_t k = team.rank; k < n; k += team.size) {
    h0s[k] = cvt<Acc>(h0g[k]);
    gh0[k] = Acc(0);
    const int64_t b = k / FD, r = k % FD;
    for (int t = 1; t <= L; ++t)
      a(t)[k] = saved == nullptr ? Acc(0) : cvt<Acc>(saved[(b * L + (t - 1)) * FD + r]);
  }
  team_sync();
  // Without saved messages: recompute a^1..a^L; h^t goes to delta / dprev alternately (both free
  // until the backward).
  const Acc* hprev = h0s;
  for (int t = 1; t <= L && saved == nullptr; ++t) {
    layer_accumulate_tile<K, T, Acc>(prm.p + (t - 1) * layer_numel,
                                     prm.q == nullptr ? nullptr : prm.q + (t - 1) * q_layer_numel,
                                     hprev, a(t), scratch, wbuf, nb, F, D, cfg, team);
    if (t < L) {
      Acc* h = (t & 1) ? delta : dprev;
      for (int64_t k = team.rank; k < n; k += team.size) h[k] = h0s[k] * a(t)[k];
      team_sync();
      hprev = h;
    }
  }
  // delta^L = G[L] broadcast over d (+ dLoss/dz)
  for (int64_t k = team.rank; k < n; k += team.size) {
    const int64_t b = k / FD;
    const int j = int((k % FD) / D);
    delta[k] = cvt<Acc>(gs[b * sample_states + int64_t(L) * F + j]) +
               (gsum == nullptr ? Acc(0) : cvt<Acc>(gsum[k]));
  }
  team_sync();
  for (int t = L; t >= 1; --t) {
    // dh0 += delta^t * a^t; delta^t becomes alpha = delta^t * h0 in place; rebuild h^{t-1}.
    const Acc* at = a(t);
    const Acc* aprev = t >= 2 ? a(t - 1) : nullptr;
    for (int64_t k = team.rank; k < n; k += team.size) {
      const Acc dl = delta[k];
      gh0[k] += dl * at[k];
      delta[k] = dl * h0s[k];
      if (aprev != nullptr) hbuf[k] = h0s[k] * aprev[k];
    }
    team_sync();
    layer_backward_tile<K, T, Acc>(
        prm.p + (t - 1) * layer_numel, prm.q == nullptr ? nullptr : prm.q + (t - 1) * q_layer_numel,
        t >= 2 ? hbuf : h0s, delta, gs + int64_t(t - 1) * F, sample_states, gsum, dprev, scratch, wbuf,
        part_p + (t - 1) * part_layer, part_q == nullptr ? nullptr : part_q + (t - 1) * part_q_layer,
        first, nb, F, D, cfg, team);
    Acc* tmp = delta;
    delta = dprev;
    dprev = tmp;
  }
  // dh0 = delta^0 + sum_t delta^t * a^t
  T* DAGFM_RESTRICT gh0g = prm.grad_h0 + b0 * FD;
  for (int64_t k = team.rank; k < n; k += team.size) gh0g[k] = cvt<T>(gh0[k] + delta[k]);
  team_sync();  // the next tile overwrites every buffer
}

// Per-block drivers: the kernels below are these with the CUDA block as the team; the host test
// calls them once per block id. Tiles go to blocks round-robin, each block in increasing order.
template <typename Acc, typename T>
DAGFM_HD void carve(const TileConfig& cfg, int F, int D, unsigned char* smem, Acc* ws_tiles,
                    Acc*& base, T*& wbuf) {
  if (cfg.staged) {
    base = reinterpret_cast<Acc*>(smem);
    wbuf = reinterpret_cast<T*>(base + tile_acc_numel(cfg, F, D));  // Acc alignment suffices
  } else {
    base = ws_tiles;
    wbuf = nullptr;
  }
}

template <Interaction K, typename T, typename Acc>
DAGFM_HD void forward_block(const PropagateParams<T>& prm, const TileConfig& cfg, int64_t block,
                            int64_t num_blocks, unsigned char* smem, Acc* ws, int64_t ws_block_numel,
                            Team team) {
  Acc* base;
  T* wbuf;
  carve<Acc, T>(cfg, prm.num_fields, prm.embed_dim, smem, ws + block * ws_block_numel, base, wbuf);
  const int64_t tiles = ceil_div64(prm.batch, cfg.tile_b);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    forward_tile<K, T, Acc>(prm, cfg, base, wbuf, tile * cfg.tile_b, team);
}

// Workspace slice of a block in the backward: [part_p | part_q (outer) | tile buffers (fallback)].
template <Interaction K>
DAGFM_HD int64_t part_numel(int F, int D, int L) {
  const int64_t per_layer = num_edges(F) * (edge_elems<K>(D) + (K == Interaction::Outer ? D : 0));
  return per_layer * L;
}

template <Interaction K, typename T, typename Acc>
DAGFM_HD void backward_block(const PropagateBackwardParams<T>& prm, const TileConfig& cfg,
                             int64_t block, int64_t num_blocks, unsigned char* smem, Acc* ws,
                             int64_t ws_block_numel, Team team) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  Acc* part_p = ws + block * ws_block_numel;
  Acc* part_q = K == Interaction::Outer ? part_p + int64_t(L) * num_edges(F) * edge_elems<K>(D)
                                        : nullptr;
  Acc* base;
  T* wbuf;
  carve<Acc, T>(cfg, F, D, smem, part_p + part_numel<K>(F, D, L), base, wbuf);
  const int64_t tiles = ceil_div64(prm.batch, cfg.tile_b);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    backward_tile<K, T, Acc>(prm, cfg, base, wbuf, part_p, part_q, tile == block,
                             tile * cfg.tile_b, team);
}

// ---------------------------------------------------------------------------------------------
// Launch planning (host). Pure arithmetic on the shapes and the device's limits, so the host
// test can check it with made-up limits.

enum class Pass { Forward, Backward };

struct LaunchPlan {
  TileConfig cfg;
  int64_t smem_bytes = 0;      // dynamic shared memory per block (0 on the fallback path)
  int64_t ws_block_numel = 0;  // Acc elements of global workspace per block
};

// Global workspace a launch may take for its per-block slices (the grid shrinks to fit; one
// block is always allowed, however large its slice).
constexpr int64_t kWorkspaceBudgetBytes = int64_t(256) << 20;

template <typename T, typename Acc>
inline LaunchPlan plan_launch(Pass pass, Interaction kind, int64_t batch, int F, int D, int L,
                              const DeviceLimits& lim) {
  const bool outer = kind == Interaction::Outer;
  const int64_t elems = kind == Interaction::Kernel ? int64_t(D) * D : int64_t(D);
  const int64_t edges = num_edges(F);
  const int64_t FD = int64_t(F) * D;
  LaunchPlan plan;
  TileConfig& cfg = plan.cfg;
  cfg.nslots = pass == Pass::Forward ? 3 : L + 5;
  cfg.nscratch = outer ? (pass == Pass::Forward ? 1 : 2) : 0;
  const int64_t nweights = outer ? 2 : 1;
  const int64_t parts =
      pass == Pass::Backward ? int64_t(L) * edges * (elems + (outer ? D : 0)) : int64_t(0);
  // Small batches: fewer samples per tile so that every multiprocessor gets a tile.
  const int64_t spread = ceil_div64(batch > 0 ? batch : 1, lim.num_sms > 0 ? lim.num_sms : 1);
  const int pref = int(spread < kMaxTileB ? spread : kMaxTileB);
  // Prefer a footprint that lets two blocks share a multiprocessor; take up to the opt-in limit
  // before giving up on shared memory.
  const int64_t hard = lim.smem_optin;
  const int64_t half = hard / 2 - 1024;  // two blocks per SM, 1 KB reserved per block
  const int64_t floor48 = hard < 48 * 1024 ? hard : 48 * 1024;
  const int64_t soft = half > floor48 ? half : floor48;
  const int64_t budgets[2] = {soft, hard};
  for (int64_t budget : budgets) {
    for (int tb = pref; tb >= 1; --tb) {
      const int64_t fixed = tb * int64_t(cfg.nslots) * FD * int64_t(sizeof(Acc));
      const int64_t per_edge =
          int64_t(cfg.nscratch) * tb * int64_t(sizeof(Acc)) + nweights * elems * int64_t(sizeof(T));
      if (fixed >= budget) continue;
      const int64_t cap = (budget - fixed) / per_edge;
      if (cap < F) continue;  // one full row (edges (0, 0..F-1)) must fit
      cfg.tile_b = tb;
      cfg.chunk_edges = cap < edges ? cap : edges;
      cfg.staged = true;
      plan.smem_bytes = fixed + cfg.chunk_edges * per_edge;
      plan.ws_block_numel = parts;
      return plan;
    }
  }
  // Fallback: tile buffers in global memory, weights read in place (through L1/L2).
  cfg.tile_b = pref;
  cfg.chunk_edges = edges;
  cfg.staged = false;
  plan.smem_bytes = 0;
  plan.ws_block_numel = parts + tile_acc_numel(cfg, F, D);
  return plan;
}

// Blocks to launch: no more than the tiles, the resident blocks (the grid is persistent) and the
// workspace budget allow; at least one.
inline int64_t choose_grid(int64_t tiles, int64_t resident_blocks, int64_t ws_block_bytes) {
  int64_t g = tiles < resident_blocks ? tiles : resident_blocks;
  if (ws_block_bytes > 0) {
    const int64_t by_ws = kWorkspaceBudgetBytes / ws_block_bytes;
    if (g > by_ws) g = by_ws;
  }
  return g < 1 ? 1 : g;
}

// ---------------------------------------------------------------------------------------------
// Kernels

#if defined(__CUDACC__)

template <Interaction K, typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    propagate_fwd_kernel(PropagateParams<T> prm, TileConfig cfg, Acc* ws, int64_t ws_block_numel) {
  forward_block<K, T, Acc>(prm, cfg, blockIdx.x, gridDim.x, dagfm_smem, ws, ws_block_numel,
                           Team{int(threadIdx.x), int(blockDim.x)});
}

template <Interaction K, typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    propagate_bwd_kernel(PropagateBackwardParams<T> prm, TileConfig cfg, Acc* ws,
                         int64_t ws_block_numel) {
  backward_block<K, T, Acc>(prm, cfg, blockIdx.x, gridDim.x, dagfm_smem, ws, ws_block_numel,
                            Team{int(threadIdx.x), int(blockDim.x)});
}

#endif  // __CUDACC__

}  // namespace one_output
}  // namespace cuda
}  // namespace dagfm
