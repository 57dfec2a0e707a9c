// Register-blocked CUDA-core forwards ("v2" for inner and outer, "v2k" for the kernel
// interaction in benchmarks/NOTES-cuda.md), no torch includes.
//
// Why: the first CUDA-core kernels (dagfm_kernels.cuh) give each thread one output and do one FMA
// per two shared-memory loads; a multiprocessor's shared memory serves 32 words per clock against
// 128 FMA lanes, so that design tops out near 1/8 of the FP32 rate. Here each thread owns a block
// of kB samples x 4 outputs and every step is a rank-1 update: kB + 4 loaded values (16-byte
// vectors) feed 4 * kB FMAs.
//
// The three products of the two interactions all have that shape (x: kB consecutive samples, y:
// 4 consecutive values):
//   inner        a[b, j, e] += h[b, i, e] * p[i, j, e]   over i;  thread: (samples, 4 j, one e)
//   outer, c     c[b, i, j] += h[b, i, d] * p[i, j, d]   over d;  thread: (samples, 4 j, one i)
//   outer, a     a[b, j, e] += c[b, i, j] * q[i, j, e]   over i;  thread: (samples, one j, 4 e)
// Shared memory per block (Acc elements):
//   S0, S1  (F, D, tbp)     h^{t-1} and a^t then h^t of the tile, samples innermost
//   W       (rows, D, wst)  p of the chunk's rows, j innermost (4 consecutive j are one vector)
//   Q       (rows, F, dp)   q of the chunk's rows (outer)
//   C       (rows, fp, tbp) c of the chunk's rows (outer)
// Each stride is a multiple of 4 elements and an odd multiple of 4 (4 mod 8): the 8 lanes of one
// 16-byte load phase then fall in 8 different bank groups. Weights outside the upper triangle (and
// j >= F) are staged as zeros, never read from global memory. A layer's weights are staged in
// chunks of `rows` rows; the first chunk stores the sums, later chunks add to them, and the chunk
// that completes an output multiplies it by h0 (read again from global memory, an L2 hit).
//
// Written as team loops like dagfm_kernels.cuh, so the host test (tests/cuda_host/rb_host_test.cpp)
// runs the same functions on shared memory poisoned with NaN, with a team of one thread and with
// blocks of emulated threads (each phase run thread after thread).
#pragma once

#include <cstdint>

#include "../dagfm_math.h"
#include "../dagfm_params.h"
#include "dagfm_kernels.cuh"

#if defined(__CUDA_ARCH__)
#define DAGFM_RB_UNROLL _Pragma("unroll")
#else
#define DAGFM_RB_UNROLL
#endif

namespace dagfm {
namespace cuda {
namespace rb {

constexpr int kJ = 4;             // outputs (or embedding elements) per thread: one vector
constexpr int kMaxThreads = 512;  // threads per block, at most
constexpr int kTiles[4] = {64, 32, 16, 8};  // samples per tile, in order of preference
constexpr int kSmallestTile = kTiles[3];

// >= n, a multiple of 4 and 4 mod 8 (see the header comment).
DAGFM_HD int pad_stride(int n) {
  int s = (n + 3) / 4 * 4;
  if (s % 8 == 0) s += 4;
  return s;
}

struct RbConfig {
  int tb = 0;    // samples per tile, a multiple of kb
  int kb = 0;    // samples per thread: 8 (tb >= 16) or 4; selects the kernel instantiation
  int rows = 0;  // weight rows per chunk (inner, outer)
  int tbp = 0, wst = 0, fp = 0, dp = 0;  // strides, see the header comment
  int nf = 0;    // kernel interaction: output fields per column block (nb = nf * D outputs)
};

struct RbPlan {
  bool ok = false;  // false: nothing fits; use dagfm_kernels.cuh
  RbConfig cfg;
  int threads = 0;
  int64_t smem_bytes = 0;
};

DAGFM_HD int groups_of(int n) { return (n + kJ - 1) / kJ; }

// Whether a planner may take tile `tb`: the pinned one when `force_tb` > 0, else any tile that
// still gives every multiprocessor a tile (small batches get small tiles; the smallest always).
DAGFM_HD bool tile_allowed(int tb, int64_t batch, const DeviceLimits& lim, int force_tb) {
  if (force_tb > 0) return tb == force_tb;
  return tb == kSmallestTile || ceil_div64(batch, tb) >= (lim.num_sms > 0 ? lim.num_sms : 1);
}

// The sample layout every plan starts from: kb samples per thread, samples padded to tbp.
DAGFM_HD RbConfig tile_config(int tb, int kb) {
  RbConfig c;
  c.tb = tb;
  c.kb = kb;
  c.tbp = pad_stride(tb);
  return c;
}
DAGFM_HD int state_numel(const RbConfig& c, int F, int D) { return F * D * c.tbp; }
DAGFM_HD int row_numel(const RbConfig& c, int F, int D, bool outer) {
  return D * c.wst + (outer ? F * c.dp + c.fp * c.tbp : 0);
}

// Threads a block uses: the largest work-item count of its phases, in whole warps, capped.
DAGFM_HD int block_threads(Interaction kind, const RbConfig& c, int F, int D) {
  const int nbg = c.tb / c.kb;
  const int G = groups_of(F);
  int items;
  if (kind == Interaction::Inner) {
    items = (G + 1) / 2 * nbg * D;  // (pair of j groups, sample block, e)
  } else {
    const int a = c.rows * G * nbg;           // (row, j group, sample block)
    const int b = F * nbg * groups_of(D);     // (j, sample block, e group)
    items = a > b ? a : b;
  }
  int t = (items + 31) / 32 * 32;
  return t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t);
}

inline RbPlan plan_forward_kernel(int64_t batch, int F, int D, int acc_size, const DeviceLimits& lim,
                                  int force_tb);

// Tile size: the largest of kTiles that still gives every multiprocessor a tile (small batches get
// small tiles) and fits shared memory with at least one weight row per chunk; `force_tb` (> 0)
// pins it (tuning runs). Chunks are evened out: the same count, the fewest rows that need it. The
// kernel interaction has its own layout (plan_forward_kernel, below).
inline RbPlan plan_forward(Interaction kind, int64_t batch, int F, int D, int acc_size,
                           const DeviceLimits& lim, int force_tb = 0) {
  RbPlan plan;
  if (F < 1 || D < 1 || acc_size <= 0) return plan;
  if (kind == Interaction::Kernel) return plan_forward_kernel(batch, F, D, acc_size, lim, force_tb);
  const bool outer = kind == Interaction::Outer;
  const int64_t budget = lim.smem_optin / acc_size;
  for (int tb : kTiles) {
    if (!tile_allowed(tb, batch, lim, force_tb)) continue;
    RbConfig c = tile_config(tb, tb >= 16 ? 8 : 4);
    c.fp = groups_of(F) * kJ;
    c.wst = pad_stride(c.fp);
    c.dp = pad_stride(D);
    const int64_t fixed = 2 * int64_t(F) * D * c.tbp;
    const int64_t per_row = row_numel(c, F, D, outer);
    if (fixed + per_row > budget) continue;
    int64_t rows = (budget - fixed) / per_row;
    if (rows > F) rows = F;
    const int64_t chunks = ceil_div64(F, rows);
    c.rows = int(ceil_div64(F, chunks));
    plan.cfg = c;
    plan.threads = block_threads(kind, c, F, D);
    plan.smem_bytes = (fixed + int64_t(c.rows) * per_row) * acc_size;
    plan.ok = true;
    return plan;
  }
  return plan;
}

// 4 consecutive elements, 16-byte aligned on the device (every offset used is a multiple of 4).
DAGFM_HD void load4(const float* p, float* o) {
#if defined(__CUDA_ARCH__)
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x;
  o[1] = v.y;
  o[2] = v.z;
  o[3] = v.w;
#else
  for (int k = 0; k < 4; ++k) o[k] = p[k];
#endif
}
DAGFM_HD void load4(const double* p, double* o) {
#if defined(__CUDA_ARCH__)
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  o[0] = a.x;
  o[1] = a.y;
  o[2] = b.x;
  o[3] = b.y;
#else
  for (int k = 0; k < 4; ++k) o[k] = p[k];
#endif
}
DAGFM_HD void store4(float* p, const float* v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#else
  for (int k = 0; k < 4; ++k) p[k] = v[k];
#endif
}
DAGFM_HD void store4(double* p, const double* v) {
#if defined(__CUDA_ARCH__)
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
#else
  for (int k = 0; k < 4; ++k) p[k] = v[k];
#endif
}

// acc[b][k] += x[b] * y[k] for n steps; x advances by xs, y by ys elements per step.
template <int kB, typename Acc>
DAGFM_HD void rank1_steps(Acc (&acc)[kB][kJ], const Acc* DAGFM_RESTRICT x, int xs,
                          const Acc* DAGFM_RESTRICT y, int ys, int n) {
  for (int r = 0; r < n; ++r) {
    Acc xv[kB], yv[kJ];
    DAGFM_RB_UNROLL
    for (int v = 0; v < kB; v += 4) load4(x + v, xv + v);
    load4(y, yv);
    DAGFM_RB_UNROLL
    for (int b = 0; b < kB; ++b) {
      DAGFM_RB_UNROLL
      for (int k = 0; k < kJ; ++k) acc[b][k] += xv[b] * yv[k];
    }
    x += xs;
    y += ys;
  }
}

template <int kB, typename Acc>
DAGFM_HD void zero(Acc (&acc)[kB][kJ]) {
  DAGFM_RB_UNROLL
  for (int b = 0; b < kB; ++b) {
    DAGFM_RB_UNROLL
    for (int k = 0; k < kJ; ++k) acc[b][k] = Acc(0);
  }
}

// Where a training forward keeps a^t: msg points at messages[first sample, t - 1, j, e] (sample
// stride L * F * D), or is nullptr.
template <typename T>
struct MsgOut {
  T* msg;
  int64_t stride;
};

template <typename T>
DAGFM_HD MsgOut<T> layer_messages(const PropagateParams<T>& prm, int64_t b0, int t) {
  const int64_t FD = int64_t(prm.num_fields) * prm.embed_dim;
  if (prm.messages == nullptr) return MsgOut<T>{nullptr, 0};
  return MsgOut<T>{prm.messages + (b0 * prm.depth + (t - 1)) * FD, int64_t(prm.depth) * FD};
}

// The same, `samples` samples and `elem` elements (j * D + e) further.
template <typename T>
DAGFM_HD MsgOut<T> offset(MsgOut<T> m, int samples, int elem) {
  if (m.msg == nullptr) return m;
  return MsgOut<T>{m.msg + samples * m.stride + elem, m.stride};
}

// dst[b] (kB consecutive samples of one (j, e) state) = sum, accumulated over chunks: stored by
// the first chunk, added by later ones; the completing chunk keeps a^t (when asked) and multiplies
// by h0 (h0 points at h0[b0 + first sample, j, e]; samples >= nvalid are padding and stay zero).
template <int kB, typename T, typename Acc>
DAGFM_HD void store_samples(Acc* DAGFM_RESTRICT dst, const Acc (&val)[kB], bool first, bool last,
                            const T* DAGFM_RESTRICT h0, int64_t FD, int nvalid, MsgOut<T> msg) {
  DAGFM_RB_UNROLL
  for (int v = 0; v < kB; v += 4) {
    Acc out[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    if (!first) load4(dst + v, out);
    DAGFM_RB_UNROLL
    for (int u = 0; u < 4; ++u) {
      const int b = v + u;
      Acc s = first ? val[b] : out[u] + val[b];
      if (last && b < nvalid && msg.msg != nullptr) msg.msg[b * msg.stride] = cvt<T>(s);
      if (last) s = b < nvalid ? s * cvt<Acc>(h0[int64_t(b) * FD]) : Acc(0);
      out[u] = s;
    }
    store4(dst + v, out);
  }
}

// states[b0 + b, t, j] = sum_e buf[j, e, b] for the tile's valid samples. Lanes run over samples
// (consecutive words: no bank conflicts).
template <typename T, typename Acc>
DAGFM_HD void write_state_sums(const Acc* DAGFM_RESTRICT buf, T* DAGFM_RESTRICT st, int t, int nb,
                               int F, int D, int L, int tbp, Team team) {
  const int64_t sample_states = int64_t(L + 1) * F;
  for (int k = team.rank; k < nb * F; k += team.size) {
    const int b = k % nb;
    const int j = k / nb;
    const Acc* col = buf + j * D * tbp + b;
    Acc s = Acc(0);
    for (int e = 0; e < D; ++e) s += col[e * tbp];
    st[b * sample_states + int64_t(t) * F + j] = cvt<T>(s);
  }
}

// Copy loops below run "warp rows": warp w takes rows w, w + warps, ... and its lanes the columns,
// so no element needs an integer division (a few dozen instructions on a GPU), and each lane keeps
// kBatch loads in flight before its stores. With a team of one (host test) lanes = warps = 1.
struct WarpRows {
  int lane, lanes, warp, warps;
};

DAGFM_HD WarpRows warp_rows(Team team) {
  const int lanes = team.size < 32 ? team.size : 32;
  const int warps = team.size / lanes;
  // Threads past the last whole warp (a team that is not a multiple of 32) take no rows: the
  // backward's loads accumulate, so no row may be visited twice.
  const int warp = team.rank < warps * lanes ? team.rank / lanes : 1 << 30;
  return WarpRows{team.rank % lanes, lanes, warp, warps};
}

constexpr int kBatch = 8;  // loads in flight per lane in the copy loops (latency-bound at small B)

// W[ir, e, jj] = p[i0 + ir, jj, e] on the upper triangle (jj >= i, jj < F), else 0, for jj < fp.
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
      Acc* dst = w + r * c.wst;
      DAGFM_RB_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int jj = wr.lane + h * wr.lanes;
        if (jj < c.fp) dst[jj] = v[u][h];
      }
      // Columns past two sweeps (fp > 2 * lanes: F > 64 on a GPU, any F on the host).
      const int64_t i = i0 + r / D;
      const T* src = p + i * F * D + r % D;
      for (int jj = wr.lane + 2 * wr.lanes; jj < c.fp; jj += wr.lanes)
        dst[jj] = (jj >= i && jj < F) ? cvt<Acc>(src[int64_t(jj) * D]) : Acc(0);
    }
  }
}

// Q[ir, j, e] = q[i0 + ir, j, e] for j >= i and e < D, else 0, for e < dp. Rows (ir, j), columns e:
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
      Acc* dst = qs + r * c.dp;
      if (wr.lane < c.dp) dst[wr.lane] = v[u];
      for (int e = wr.lane + wr.lanes; e < c.dp; e += wr.lanes)  // D > 32, or the host
        dst[e] = (j >= i && e < D) ? cvt<Acc>(q[(int64_t(i) * F + j) * D + e]) : Acc(0);
    }
  }
}

// S[r, b] = h0[b0 + b, r] (r = (i, e)) for valid samples, 0 for padding ones. Rows b, columns r:
// coalesced global loads.
template <typename T, typename Acc>
DAGFM_HD void load_tile(const T* DAGFM_RESTRICT h0g, Acc* DAGFM_RESTRICT s, int nb, int FD,
                        const RbConfig& c, Team team) {
  const WarpRows wr = warp_rows(team);
  for (int b = wr.warp; b < c.tb; b += wr.warps) {
    const T* src = h0g + int64_t(b) * FD;
    for (int r0 = wr.lane; r0 < FD; r0 += wr.lanes * kBatch) {
      Acc v[kBatch];
      DAGFM_RB_UNROLL
      for (int u = 0; u < kBatch; ++u) {
        const int r = r0 + u * wr.lanes;
        v[u] = (b < nb && r < FD) ? cvt<Acc>(src[r]) : Acc(0);
      }
      DAGFM_RB_UNROLL
      for (int u = 0; u < kBatch; ++u) {
        const int r = r0 + u * wr.lanes;
        if (r < FD) s[r * c.tbp + b] = v[u];
      }
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
  const int nbg = c.tb / kB;
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
      rank1_steps<kB>(acc, sprev + (i0 * D + e) * c.tbp + bg * kB, D * c.tbp, w + e * c.wst + j0,
                      D * c.wst, iend - i0);
      const bool first = i0 == 0;
      const bool last = i1 >= (F < j0 + kJ ? F : j0 + kJ);
      DAGFM_RB_UNROLL
      for (int jj = 0; jj < kJ; ++jj) {
        const int j = j0 + jj;
        if (j >= F) break;
        Acc col[kB];
        DAGFM_RB_UNROLL
        for (int b = 0; b < kB; ++b) col[b] = acc[b][jj];
        store_samples<kB>(snext + (j * D + e) * c.tbp + bg * kB, col, first, last,
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
  const int nbg = c.tb / kB;
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
    rank1_steps<kB>(acc, sprev + i * D * c.tbp + bg * kB, c.tbp, w + ir * D * c.wst + j0, c.wst, D);
    DAGFM_RB_UNROLL
    for (int jj = 0; jj < kJ; ++jj) {
      Acc* dst = cbuf + (ir * c.fp + j0 + jj) * c.tbp + bg * kB;
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
    store_samples<kB>(snext + (j * D + e) * c.tbp + bg * kB, col, first, last,
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
  const int nbg = c.tb / kB;
  const int n = F * nbg * DG;
  const bool resident = n <= team.size;
  for (int k = team.rank; k < n; k += team.size) {
    const int eg = k % DG;
    const int bg = (k / DG) % nbg;
    const int j = k / (DG * nbg);
    if (j < i0) continue;  // finished in an earlier chunk
    const int iend = i1 < j + 1 ? i1 : j + 1;
    const Acc* x = cbuf + j * c.tbp + bg * kB;
    const Acc* y = qs + j * c.dp + eg * kJ;
    if (resident) {
      if (i0 == 0) zero(keep.acc);
      rank1_steps<kB>(keep.acc, x, c.fp * c.tbp, y, F * c.dp, iend - i0);
      if (i1 > j) store_outer_item<kB>(keep.acc, snext, h0g, msg, true, true, j, eg, bg, nb, F, D, c);
    } else {
      Acc acc[kB][kJ];
      zero(acc);
      rank1_steps<kB>(acc, x, c.fp * c.tbp, y, F * c.dp, iend - i0);
      store_outer_item<kB>(acc, snext, h0g, msg, i0 == 0, i1 > j, j, eg, bg, nb, F, D, c);
    }
  }
}

// How a tile's phases run. On the GPU each thread runs its share of a phase, then the block
// meets at a barrier (when the next phase reads what this one wrote). The host test also runs
// them as `size` emulated threads one after another, which checks how the work is split.
struct BlockExec {
  Team team;
  template <typename Phase>
  DAGFM_HD void operator()(const Phase& phase, bool sync = true) const {
    phase(team);
    if (sync) team_sync();
  }
  // A thread's state kept across phases: its own variable (registers) on the GPU.
  template <typename Local>
  DAGFM_HD Local& local(Local& mine, Team) const {
    return mine;
  }
};

// Every layer for the tile starting at sample b0; writes states[b0 .. b0 + nb) once.
template <Interaction K, int kB, typename T, typename Acc, typename Exec>
DAGFM_HD void forward_tile(const PropagateParams<T>& prm, const RbConfig& c, Acc* smem, int64_t b0,
                           const Exec& exec, OuterLocal<kB, Acc>& mine) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  const int FD = F * D;
  const int nb = int(imin64(c.tb, prm.batch - b0));
  Acc* sprev = smem;
  Acc* snext = smem + state_numel(c, F, D);
  Acc* w = snext + state_numel(c, F, D);
  Acc* qs = w + c.rows * D * c.wst;
  Acc* cbuf = qs + c.rows * F * c.dp;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  T* DAGFM_RESTRICT st = prm.states + b0 * int64_t(L + 1) * F;

  // h^0, samples innermost; padding samples are zero (and stay zero through every layer).
  exec([&](Team tm) { load_tile(h0g, sprev, nb, FD, c, tm); });
  exec([&](Team tm) { write_state_sums(sprev, st, 0, nb, F, D, L, c.tbp, tm); }, false);
  for (int t = 1; t <= L; ++t) {
    const T* p = prm.p + int64_t(t - 1) * F * FD;
    const T* q = K == Interaction::Outer ? prm.q + int64_t(t - 1) * F * FD : nullptr;
    for (int i0 = 0; i0 < F; i0 += c.rows) {
      const int i1 = i0 + c.rows < F ? i0 + c.rows : F;
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
    exec([&](Team tm) { write_state_sums(snext, st, t, nb, F, D, L, c.tbp, tm); }, false);
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
  const int64_t tiles = ceil_div64(prm.batch, c.tb);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    forward_tile<K, kB, T, Acc>(prm, c, smem, tile * c.tb, exec, mine);
}

// ---------------------------------------------------------------------------------------------
// The kernel interaction, exact: per layer a block-triangular matrix product of the tile's states
// (tb x F*D) with W_t (F*D x F*D; block (i, j) = W_t[i, j], zero for i > j), on CUDA cores with
// the same rank-1 microkernel. The outputs go in column blocks of nf fields (nb = nf * D <= 128
// outputs), last block first, written in place over the states: block [j0, j1) reads input
// fields i < j1 only, and the blocks after it (lower fields) never read fields >= j0. Each thread
// owns kB samples x 4 outputs of the block and keeps their sums in registers across the block's
// j1 weight slabs (slab = field i: D x nb weights, double-buffered in shared memory, the next
// slab's loads issued before the current slab's arithmetic). Needs D % 4 == 0 (a 4-output group
// never straddles two fields) and 16-byte aligned weights; other shapes use the first kernels.
//
// Shared memory (Acc): S (F*D, tbp) the states, samples innermost; two slabs (D, nb).

constexpr int kKernelCols = 128;  // outputs per column block, at most (when D divides it)
constexpr int kPrefetch = 4;      // 4-weight units per thread whose loads overlap a slab's arithmetic

DAGFM_HD int kernel_units(const RbConfig& c, int D) { return D * c.nf * D / 4; }  // per slab
DAGFM_HD int kernel_items(const RbConfig& c, int D) { return c.nf * D / 4 * (c.tb / c.kb); }
DAGFM_HD int64_t kernel_smem_numel(const RbConfig& c, int F, int D) {
  return int64_t(F) * D * c.tbp + 2 * int64_t(D) * c.nf * D;
}

inline RbPlan plan_forward_kernel(int64_t batch, int F, int D, int acc_size, const DeviceLimits& lim,
                                  int force_tb) {
  RbPlan plan;
  if (D % 4 != 0) return plan;
  for (int tb : kTiles) {
    if (!tile_allowed(tb, batch, lim, force_tb)) continue;
    RbConfig c = tile_config(tb, tb >= 16 ? 8 : 4);
    c.nf = kKernelCols / D < 1 ? 1 : (kKernelCols / D > F ? F : kKernelCols / D);
    const int items = kernel_items(c, D);
    if (items > kMaxThreads) continue;  // every item keeps its sums in one thread's registers
    const int64_t bytes = kernel_smem_numel(c, F, D) * acc_size;
    if (bytes > lim.smem_optin) continue;
    plan.cfg = c;
    plan.threads = (items + 31) / 32 * 32;
    plan.smem_bytes = bytes;
    plan.ok = true;
    return plan;
  }
  return plan;
}

// 4 consecutive elements of T from global memory, as Acc (one 16-byte load for float).
template <typename T, typename Acc>
DAGFM_HD void load4_global(const T* DAGFM_RESTRICT p, Acc* o) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4 && sizeof(Acc) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = cvt<Acc>(v.x);
    o[1] = cvt<Acc>(v.y);
    o[2] = cvt<Acc>(v.z);
    o[3] = cvt<Acc>(v.w);
  } else {
    for (int k = 0; k < 4; ++k) o[k] = cvt<Acc>(p[k]);
  }
#else
  for (int k = 0; k < 4; ++k) o[k] = cvt<Acc>(p[k]);
#endif
}

// What one thread keeps between the phases of a column block: its output sums, and where its
// share of each weight slab comes from and goes to (fixed for the whole kernel).
template <int kB, typename Acc>
struct KernelLocal {
  Acc acc[kB][kJ];
  Acc pre[kPrefetch][4];
  int src[kPrefetch];  // offset of the unit in global memory, relative to W_t[i, j0, 0, 0]
  int col[kPrefetch];  // field of the unit within the block
  int dst[kPrefetch];  // offset of the unit in the slab
  int nunits;          // units of this thread (<= kPrefetch prefetched, the rest copied after)
};

// Unit u of a slab: row d, 4 outputs starting at column n4 * 4 = (field jj, element e).
DAGFM_HD void kernel_unit(int u, int nb4, int D, int& src, int& col, int& dst) {
  const int d = u / nb4;
  const int n = (u % nb4) * 4;
  const int jj = n / D, e = n % D;
  col = jj;
  src = (jj * D + d) * D + e;
  dst = d * nb4 * 4 + n;
}

template <int kB, typename Acc>
DAGFM_HD void kernel_local_init(KernelLocal<kB, Acc>& l, const RbConfig& c, int D, Team team) {
  const int units = kernel_units(c, D);
  l.nunits = 0;
  for (int u = team.rank, m = 0; u < units && m < kPrefetch; u += team.size, ++m) {
    kernel_unit(u, c.nf * D / 4, D, l.src[m], l.col[m], l.dst[m]);
    l.nunits = m + 1;
  }
}

// Slab loads of this thread: weights of field i for the block's fields [j0, j1), zero where
// j < i or j >= j1 (the last block may be narrower).
template <int kB, typename T, typename Acc>
DAGFM_HD void kernel_slab_load(KernelLocal<kB, Acc>& l, const T* DAGFM_RESTRICT wi, int i, int j0,
                               int j1) {
  DAGFM_RB_UNROLL
  for (int m = 0; m < kPrefetch; ++m) {
    if (m >= l.nunits) break;
    const int j = j0 + l.col[m];
    if (j >= i && j < j1) {
      load4_global(wi + l.src[m], l.pre[m]);
    } else {
      DAGFM_RB_UNROLL
      for (int k = 0; k < 4; ++k) l.pre[m][k] = Acc(0);
    }
  }
}

// Stores the prefetched units, then copies this thread's remaining units directly.
template <int kB, typename T, typename Acc>
DAGFM_HD void kernel_slab_store(const KernelLocal<kB, Acc>& l, Acc* DAGFM_RESTRICT slab,
                                const T* DAGFM_RESTRICT wi, int i, int j0, int j1, int D,
                                const RbConfig& c, Team team) {
  DAGFM_RB_UNROLL
  for (int m = 0; m < kPrefetch; ++m) {
    if (m >= l.nunits) break;
    store4(slab + l.dst[m], l.pre[m]);
  }
  const int units = kernel_units(c, D);
  for (int u = team.rank + kPrefetch * team.size; u < units; u += team.size) {
    int src, col, dst;
    kernel_unit(u, c.nf * D / 4, D, src, col, dst);
    Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    if (j0 + col >= i && j0 + col < j1) load4_global(wi + src, v);
    store4(slab + dst, v);
  }
}

template <int kB, typename T, typename Acc, typename Exec>
DAGFM_HD void kernel_forward_tile(const PropagateParams<T>& prm, const RbConfig& c, Acc* smem,
                                  int64_t b0, const Exec& exec, KernelLocal<kB, Acc>& mine) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  const int FD = F * D;
  const int nb = int(imin64(c.tb, prm.batch - b0));
  const int ncols = c.nf * D;
  const int nb4 = ncols / 4;
  const int items = kernel_items(c, D);
  Acc* S = smem;
  Acc* const slab0 = smem + FD * c.tbp;  // slab k % 2 at slab0 + (k % 2) * slab_numel
  const int slab_numel = D * ncols;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  T* DAGFM_RESTRICT st = prm.states + b0 * int64_t(L + 1) * F;

  exec([&](Team tm) {
    load_tile(h0g, S, nb, FD, c, tm);
    kernel_local_init(exec.local(mine, tm), c, D, tm);
  });
  exec([&](Team tm) { write_state_sums(S, st, 0, nb, F, D, L, c.tbp, tm); }, false);
  for (int t = 1; t <= L; ++t) {
    const T* W = prm.p + int64_t(t - 1) * F * F * D * D;
    for (int j0 = (F - 1) / c.nf * c.nf; j0 >= 0; j0 -= c.nf) {
      const int j1 = j0 + c.nf < F ? j0 + c.nf : F;
      auto slab_src = [&](int i) { return W + (int64_t(i) * F + j0) * D * D; };
      exec([&](Team tm) {  // slab 0, and zero sums
        KernelLocal<kB, Acc>& l = exec.local(mine, tm);
        kernel_slab_load(l, slab_src(0), 0, j0, j1);
        kernel_slab_store(l, slab0, slab_src(0), 0, j0, j1, D, c, tm);
        zero(l.acc);
      });
      for (int i = 0; i < j1; ++i) {
        exec([&](Team tm) {
          KernelLocal<kB, Acc>& l = exec.local(mine, tm);
          const bool next = i + 1 < j1;
          if (next) kernel_slab_load(l, slab_src(i + 1), i + 1, j0, j1);
          if (tm.rank < items) {
            const int ng = tm.rank % nb4, bg = tm.rank / nb4;
            rank1_steps<kB>(l.acc, S + i * D * c.tbp + bg * kB, c.tbp, slab0 + (i & 1) * slab_numel + ng * 4,
                            ncols, D);
          }
          if (next)
            kernel_slab_store(l, slab0 + ((i + 1) & 1) * slab_numel, slab_src(i + 1), i + 1, j0, j1, D, c, tm);
        });
      }
      // h = h0 * a for the block's outputs, in place (nothing reads fields >= j0 any more).
      exec([&](Team tm) {
        if (tm.rank >= items) return;
        KernelLocal<kB, Acc>& l = exec.local(mine, tm);
        const int ng = tm.rank % nb4, bg = tm.rank / nb4;
        DAGFM_RB_UNROLL
        for (int u = 0; u < kJ; ++u) {
          const int n = j0 * D + ng * 4 + u;
          if (n >= j1 * D) break;
          Acc col[kB];
          DAGFM_RB_UNROLL
          for (int b = 0; b < kB; ++b) col[b] = l.acc[b][u];
          store_samples<kB>(S + n * c.tbp + bg * kB, col, true, true, h0g + int64_t(bg) * kB * FD + n,
                            FD, nb - bg * kB, offset(layer_messages(prm, b0, t), bg * kB, n));
        }
      });
    }
    exec([&](Team tm) { write_state_sums(S, st, t, nb, F, D, L, c.tbp, tm); }, false);
  }
  exec([](Team) {});  // a barrier: the next tile overwrites S
}

template <int kB, typename T, typename Acc, typename Exec>
DAGFM_HD void kernel_forward_block(const PropagateParams<T>& prm, const RbConfig& c, int64_t block,
                                   int64_t num_blocks, Acc* smem, const Exec& exec) {
  KernelLocal<kB, Acc> mine;  // a thread's own (on the host test: a stand-in, see Exec::local)
  const int64_t tiles = ceil_div64(prm.batch, c.tb);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    kernel_forward_tile<kB, T, Acc>(prm, c, smem, tile * c.tb, exec, mine);
}

// ---------------------------------------------------------------------------------------------
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
// Shared memory (Acc): A, Hp (F*D, tbp) and Wt (F, D, wst).

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
    c.fp = groups_of(F) * kJ;
    c.wst = pad_stride(c.fp);
    const int64_t bytes = (2 * int64_t(F) * D * c.tbp + int64_t(F) * D * c.wst) * acc_size;
    if (bytes > lim.smem_optin) continue;
    const int delta_items = (groups_of(F) + 1) / 2 * (tb / c.kb) * D;
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

// Wt[j, e, ii] = p[ii, j, e] for ii <= j (ii < F), else 0, for ii < fp. Rows (j, e), columns ii.
template <typename T, typename Acc>
DAGFM_HD void stage_weights_by_target(const T* DAGFM_RESTRICT p, Acc* DAGFM_RESTRICT wt, int F,
                                      int D, const RbConfig& c, Team team) {
  const WarpRows wr = warp_rows(team);
  for (int r = wr.warp; r < F * D; r += wr.warps) {
    const int j = r / D, e = r % D;
    for (int ii = wr.lane; ii < c.fp; ii += wr.lanes)
      wt[r * c.wst + ii] = (ii <= j && ii < F) ? cvt<Acc>(p[(int64_t(ii) * F + j) * D + e]) : Acc(0);
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
  const int nb = int(imin64(c.tb, prm.batch - b0));
  const int nbg = c.tb / kB;
  const int64_t srow = int64_t(L + 1) * F;
  Acc* A = smem;
  Acc* Hp = smem + FD * c.tbp;
  const Acc* Wt = Hp + FD * c.tbp;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  const T* DAGFM_RESTRICT gs = prm.grad_states + b0 * srow;
  const T* DAGFM_RESTRICT msg = prm.saved_messages + b0 * int64_t(L) * FD;
  const T* DAGFM_RESTRICT gsum = prm.grad_sum == nullptr ? nullptr : prm.grad_sum + b0 * FD;
  const Acc* DAGFM_RESTRICT din = static_cast<const Acc*>(a.delta_in) + (a.delta_in ? b0 * FD : 0);
  Acc* DAGFM_RESTRICT gh = static_cast<Acc*>(a.gh) + b0 * FD;

  exec([&](Team tm) {  // load: rows b, columns (i, e): coalesced global reads
    const WarpRows wr = warp_rows(tm);
    for (int b = wr.warp; b < c.tb; b += wr.warps)
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
        A[r * c.tbp + b] = av;
        Hp[r * c.tbp + b] = hv;
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
        rank1_steps<kB>(acc, A + (i0 * D + e) * c.tbp + bg * kB, D * c.tbp, Wt + (i0 * D + e) * c.wst + i0,
                        D * c.wst, F - i0);
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
        hrow[u] = Hp + (i * D + e) * c.tbp;
        arow[u] = A + (j * D + e) * c.tbp;
      }
      for (int b = 0; b < c.tb; b += 4) {
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
    stage_weights_by_target(prm.p + int64_t(a.t - 1) * F * F * D, smem + 2 * F * D * c.tbp, F, D, c, tm);
    InnerBwdLocal<Acc>& l = exec.local(mine, tm);
    for (int m = 0; m < kBwdMaxItems; ++m)
      for (int ii = 0; ii < kJ; ++ii)
        for (int jj = 0; jj < kJ; ++jj) l.dw[m][ii][jj] = Acc(0);
  });
  const int64_t tiles = ceil_div64(prm.batch, c.tb);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    inner_backward_tile<T, Acc>(prm, a, c, smem, tile * c.tb, exec, mine);
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
template <Interaction K, int kB, typename T, typename Acc>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(PropagateParams<T> prm, RbConfig c) {
  forward_block<K, kB, T, Acc>(prm, c, blockIdx.x, gridDim.x, reinterpret_cast<Acc*>(dagfm_smem),
                               BlockExec{Team{int(threadIdx.x), int(blockDim.x)}});
}

template <int kB, typename T, typename Acc>
__global__ void __launch_bounds__(kMaxThreads) kernel_forward_kernel(PropagateParams<T> prm, RbConfig c) {
  kernel_forward_block<kB, T, Acc>(prm, c, blockIdx.x, gridDim.x, reinterpret_cast<Acc*>(dagfm_smem),
                                   BlockExec{Team{int(threadIdx.x), int(blockDim.x)}});
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kMaxThreads)
    inner_backward_kernel(PropagateBackwardParams<T> prm, InnerBwdArgs a, RbConfig c) {
  inner_backward_block<T, Acc>(prm, a, c, blockIdx.x, gridDim.x, reinterpret_cast<Acc*>(dagfm_smem),
                               BlockExec{Team{int(threadIdx.x), int(blockDim.x)}});
}

// Launches forward_kernel (kernel_forward_kernel for the kernel interaction) with `plan` on a
// persistent grid.
// Defined in dagfm_rb.cu (no torch headers, its own translation unit) for T / Acc = float / float,
// double / double, __half / float and __nv_bfloat16 / float.
template <typename T, typename Acc>
cudaError_t launch_forward(const PropagateParams<T>& prm, const RbPlan& plan, int num_sms,
                           cudaStream_t stream);

// The inner backward (plan_backward_inner): its grid (persistent, the same for every layer),
// then the L layer launches. The caller gives a workspace of backward_inner_workspace_numel Acc
// elements and afterwards adds the per-block partials (at part_offset, per block
// part_block_numel) with reduce_weight_grad_kernel.
template <typename T, typename Acc>
cudaError_t backward_inner_grid(const RbPlan& plan, int64_t batch, int num_sms, int64_t& grid);
template <typename T, typename Acc>
cudaError_t launch_backward_inner(const PropagateBackwardParams<T>& prm, const RbPlan& plan,
                                  int64_t grid, Acc* ws, cudaStream_t stream);
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
