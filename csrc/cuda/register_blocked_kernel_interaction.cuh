// Register-blocked CUDA-core forward of the kernel interaction, exact (namespace rb; the shared
// layout and microkernel are in register_blocked.cuh). No torch includes.
//
// Per layer a block-triangular matrix product of the tile's states (tile_samples x F*D) with W_t
// (F*D x F*D; block (i, j) = W_t[i, j], zero for i > j), on CUDA cores with the rank-1
// microkernel. The outputs go in column blocks of fields_per_block fields (nb =
// fields_per_block * D <= 128 outputs), last block first, written in place over the states: block
// [j0, j1) reads input fields i < j1 only, and the blocks after it (lower fields) never read fields
// >= j0. Each thread owns kB samples x 4 outputs of the block and keeps their sums in registers
// across the block's j1 weight slabs (slab = field i: D x nb weights, double-buffered in shared
// memory, the next slab's loads issued before the current slab's arithmetic). Needs D % 4 == 0 (a
// 4-output group never straddles two fields) and 16-byte aligned weights; other shapes use the
// one-output-per-thread kernels.
//
// Shared memory (Acc): S (F*D, sample_stride) the states, samples innermost; two slabs (D, nb).
#pragma once

#include <cstdint>

#include "register_blocked.cuh"

namespace dagfm {
namespace cuda {
namespace rb {

constexpr int kKernelCols = 128;  // outputs per column block, at most (when D divides it)
constexpr int kPrefetch = 4;      // 4-weight units per thread whose loads overlap a slab's arithmetic

DAGFM_HD int kernel_units(const RbConfig& c, int D) { return D * c.fields_per_block * D / 4; }  // per slab
DAGFM_HD int kernel_items(const RbConfig& c, int D) { return c.fields_per_block * D / 4 * (c.tile_samples / c.samples_per_thread); }
DAGFM_HD int64_t kernel_smem_numel(const RbConfig& c, int F, int D) {
  return int64_t(F) * D * c.sample_stride + 2 * int64_t(D) * c.fields_per_block * D;
}

inline RbPlan plan_forward_kernel_interaction(int64_t batch, int F, int D, int acc_size, const DeviceLimits& lim,
                                  int force_tb) {
  RbPlan plan;
  if (D % 4 != 0) return plan;
  for (int tb : kTiles) {
    if (!tile_allowed(tb, batch, lim, force_tb)) continue;
    RbConfig c = tile_config(tb, tb >= 16 ? 8 : 4);
    c.fields_per_block = kKernelCols / D < 1 ? 1 : (kKernelCols / D > F ? F : kKernelCols / D);
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
    kernel_unit(u, c.fields_per_block * D / 4, D, l.src[m], l.col[m], l.dst[m]);
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
    kernel_unit(u, c.fields_per_block * D / 4, D, src, col, dst);
    Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    if (j0 + col >= i && j0 + col < j1) load4_global(wi + src, v);
    store4(slab + dst, v);
  }
}

template <int kB, typename T, typename Acc, typename Exec>
DAGFM_HD void kernel_interaction_tile(const PropagateParams<T>& prm, const RbConfig& c, Acc* smem,
                                  int64_t b0, const Exec& exec, KernelLocal<kB, Acc>& mine) {
  const int F = prm.num_fields, D = prm.embed_dim, L = prm.depth;
  const int FD = F * D;
  const int nb = int(imin64(c.tile_samples, prm.batch - b0));
  const int ncols = c.fields_per_block * D;
  const int nb4 = ncols / 4;
  const int items = kernel_items(c, D);
  Acc* S = smem;
  Acc* const slab0 = smem + FD * c.sample_stride;  // slab k % 2 at slab0 + (k % 2) * slab_numel
  const int slab_numel = D * ncols;
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  T* DAGFM_RESTRICT st = prm.states + b0 * int64_t(L + 1) * F;

  exec([&](Team tm) {
    load_tile(h0g, S, nb, FD, c, tm);
    kernel_local_init(exec.local(mine, tm), c, D, tm);
  });
  exec([&](Team tm) { write_state_sums(S, st, 0, nb, F, D, L, c.sample_stride, tm); }, false);
  for (int t = 1; t <= L; ++t) {
    const T* W = prm.p + int64_t(t - 1) * F * F * D * D;
    for (int j0 = (F - 1) / c.fields_per_block * c.fields_per_block; j0 >= 0; j0 -= c.fields_per_block) {
      const int j1 = j0 + c.fields_per_block < F ? j0 + c.fields_per_block : F;
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
            rank1_steps<kB>(l.acc, S + i * D * c.sample_stride + bg * kB, c.sample_stride, slab0 + (i & 1) * slab_numel + ng * 4,
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
          store_samples<kB>(S + n * c.sample_stride + bg * kB, col, true, true, h0g + int64_t(bg) * kB * FD + n,
                            FD, nb - bg * kB, offset(layer_messages(prm, b0, t), bg * kB, n));
        }
      });
    }
    exec([&](Team tm) { write_state_sums(S, st, t, nb, F, D, L, c.sample_stride, tm); }, false);
  }
  exec([](Team) {});  // a barrier: the next tile overwrites S
}

template <int kB, typename T, typename Acc, typename Exec>
DAGFM_HD void kernel_interaction_block(const PropagateParams<T>& prm, const RbConfig& c, int64_t block,
                                   int64_t num_blocks, Acc* smem, const Exec& exec) {
  KernelLocal<kB, Acc> mine;  // a thread's own (on the host test: a stand-in, see Exec::local)
  const int64_t tiles = ceil_div64(prm.batch, c.tile_samples);
  for (int64_t tile = block; tile < tiles; tile += num_blocks)
    kernel_interaction_tile<kB, T, Acc>(prm, c, smem, tile * c.tile_samples, exec, mine);
}

#if defined(__CUDACC__)
template <int kB, typename T, typename Acc>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel_interaction(PropagateParams<T> prm, RbConfig c) {
  kernel_interaction_block<kB, T, Acc>(prm, c, blockIdx.x, gridDim.x, reinterpret_cast<Acc*>(dagfm_smem),
                                   BlockExec{Team{int(threadIdx.x), int(blockDim.x)}});
}
#endif  // __CUDACC__

}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
