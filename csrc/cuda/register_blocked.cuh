// What the register-blocked CUDA-core algorithms share (namespace rb): the tile layout and its
// plan, the rank-1 microkernel, the copy loops and the way a tile's phases run. The algorithms
// are in register_blocked_forward.cuh (inner and outer forward), register_blocked_kernel_
// interaction.cuh (the kernel interaction's forward) and register_blocked_inner_backward.cuh. No
// torch includes. docs/cuda.md says when they run and why.
//
// Why: the one-output-per-thread kernels (one_output_per_thread.cuh) give each thread one output and do
// one FMA per two shared-memory loads; a multiprocessor's shared memory serves 32 words per clock
// against 128 FMA lanes, so that design tops out near 1/8 of the FP32 rate. Here each thread owns
// a block of kB samples x 4 outputs and every step is a rank-1 update: kB + 4 loaded values
// (16-byte vectors) feed 4 * kB FMAs.
//
// Strides (RbConfig): each is a multiple of 4 elements and an odd multiple of 4 (4 mod 8): the 8
// lanes of one 16-byte load phase then fall in 8 different bank groups. Weights outside the upper
// triangle (and j >= F) are staged as zeros, never read from global memory.
//
// Written as team loops like one_output_per_thread.cuh, so the host test
// (tests/cuda_host/rb_host_test.cpp) runs the same functions on shared memory poisoned with NaN,
// with a team of one thread and with blocks of emulated threads (each phase run thread after
// thread).
#pragma once

#include <cstdint>

#include "common.cuh"

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

// A tile's layout. Strides count Acc elements and are 4 mod 8 (see the header comment).
struct RbConfig {
  int tile_samples = 0;        // samples per tile, a multiple of samples_per_thread
  int samples_per_thread = 0;  // kB: 8 (tiles of 16+) or 4; selects the template instantiation
  int rows_per_chunk = 0;      // weight rows staged per chunk (inner, outer forward)
  int sample_stride = 0;       // tile_samples padded: the stride between two states' sample rows
  int weight_stride = 0;       // padded_fields padded: the stride between two staged weight rows
  int padded_fields = 0;       // F rounded up to a multiple of 4 (a whole number of 4-wide vectors)
  int padded_dim = 0;          // D padded: the stride between two staged q rows (outer)
  int fields_per_block = 0;    // kernel interaction: output fields per column block
};

struct RbPlan {
  bool ok = false;  // false: nothing fits; use the one-output-per-thread kernels
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

// The sample layout every plan starts from: kb samples per thread, samples padded to a stride.
DAGFM_HD RbConfig tile_config(int tb, int kb) {
  RbConfig c;
  c.tile_samples = tb;
  c.samples_per_thread = kb;
  c.sample_stride = pad_stride(tb);
  return c;
}
DAGFM_HD int state_numel(const RbConfig& c, int F, int D) { return F * D * c.sample_stride; }

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

// S[r, b] = h0[b0 + b, r] (r = (i, e)) for valid samples, 0 for padding ones. Rows b, columns r:
// coalesced global loads.
template <typename T, typename Acc>
DAGFM_HD void load_tile(const T* DAGFM_RESTRICT h0g, Acc* DAGFM_RESTRICT s, int nb, int FD,
                        const RbConfig& c, Team team) {
  const WarpRows wr = warp_rows(team);
  for (int b = wr.warp; b < c.tile_samples; b += wr.warps) {
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
        if (r < FD) s[r * c.sample_stride + b] = v[u];
      }
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

}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
