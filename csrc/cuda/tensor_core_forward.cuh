// Tensor-core forward of the kernel interaction (namespace tc), no torch includes. When it runs:
// docs/cuda.md.
//
// Per layer the kernel interaction is one block-triangular matrix product per sample tile:
//     A (rows x F*D) = H (rows x F*D) . W_t,   W_t's (i, j) block = W_t[i, j] (D x D), zero for i > j
//     h^t = h0 * A (elementwise),  s^t_j = sum_d h^t_j[d]
// Each warp owns a tile of kRows = 16 samples (the MMA's M; 32 with MT = 2 row tiles, a variant
// that shares each weight fragment between two MMAs) and runs every layer for it, alone: no
// block barrier anywhere, only __syncwarp. The warp keeps its tile's states in one shared-memory
// buffer (16 rows x F*D, row-padded) and updates it in place, visiting the output column blocks
// j = F-1 down to 0: output j reads input columns i <= j only, so once column j is written no later
// (smaller) column needs its old value. Per column j the warp accumulates (16 x D) += (16 x D_k)
// (D_k x D) fragment products over i = 0..j (two accumulator sets, even and odd i, so consecutive
// MMAs do not wait on each other), stores the accumulator to a small float scratch tile, and
// finishes h^t_j = h0_j * a^t_j and the state sums there. The weight fragments are loaded straight
// from global memory (the layer is 0.4-0.8 MB at F=39, D=16: it stays in L2, and the warps of a
// multiprocessor walk it in the same order, so L1 serves most repeats; see benchmarks/NOTES-cuda.md).
//
// Storage type T is the MMA operand type: __half and __nv_bfloat16 (m16n16k16), or float as TF32
// (m16n16k8; the operands are rounded to TF32 at load, the sums stay float). Accumulation is float.
// D must be 16, 32, 48 or 64 (NF = D / 16 output fragments per column block); other shapes, exact
// float32 and float64 use the CUDA-core kernels.
//
// The tile arithmetic is written against an "Mma" policy (fragment types and load / mma / store)
// and a team of lanes, so the host test (tests/cuda_host/tc_host_test.cpp) runs the same function
// with a plain-C++ policy and a team of one: that checks every index, the in-place order, ragged
// tiles and the epilogue without a GPU; the WMMA policy below is only compile-checked there.
#pragma once

#include <cstdint>

#include "common.cuh"

#if defined(__CUDACC__)
#include <mma.h>
#endif

namespace dagfm {
namespace cuda {
namespace tc {

constexpr int kRows = 16;     // samples per MMA row tile (the MMA's M); a warp owns MT of them
constexpr int kMaxRowTiles = 2;  // MT: 2 shares each weight fragment between two MMAs (D <= 32)
constexpr int kMaxWarps = 8;  // warps per block, at most
constexpr int kWarpSize = 32;

DAGFM_HD void warp_sync() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#endif
}

// Embedding dims with a tensor-core kernel.
DAGFM_HD bool supported_dim(int D) { return D >= 16 && D <= 64 && D % 16 == 0; }

DAGFM_HD int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Leading dimension (elements) of a warp's state buffer: F*D rounded up to 16 bytes, plus 16 bytes
// when the row is an even number of 16-byte units. An odd number puts the 8 rows that one
// 8x(16 bytes) fragment load touches in 8 different bank groups (no shared-memory bank conflicts).
inline int64_t state_ld(int F, int D, int elem_size) {
  const int64_t per16 = 16 / elem_size;
  int64_t ld = round_up(int64_t(F) * D, per16);
  if ((ld / per16) % 2 == 0) ld += per16;
  return ld;
}

struct TcPlan {
  bool ok = false;         // false: no tensor-core launch fits (use the CUDA-core kernels)
  int mt = 1;              // row tiles per warp: a warp owns 16 * mt samples
  int warps = 0;           // warps per block
  int64_t ld = 0;          // leading dimension of a warp's state buffer (elements)
  int64_t state_bytes = 0; // bytes of one warp's state buffer (128-byte multiple)
  int64_t warp_bytes = 0;  // bytes of one warp's slice: state buffer, then 16 mt x D float scratch
  int64_t smem_bytes = 0;  // dynamic shared memory per block
};

// Warps per block: the count that keeps the most warps resident per multiprocessor (ties: more
// per block), within the opt-in per-block limit. mt = 2 (two row tiles per warp) only for D <= 32,
// where the accumulators stay in registers. Pure arithmetic, host-tested.
inline TcPlan plan_forward(int F, int D, int elem_size, const DeviceLimits& lim, int mt = 1) {
  TcPlan plan;
  if (!supported_dim(D) || F < 1 || mt < 1 || mt > kMaxRowTiles || (mt > 1 && D > 32)) return plan;
  plan.mt = mt;
  const int64_t rows = int64_t(kRows) * mt;
  plan.ld = state_ld(F, D, elem_size);
  plan.state_bytes = round_up(rows * plan.ld * elem_size, 128);
  plan.warp_bytes = plan.state_bytes + round_up(rows * D * int64_t(sizeof(float)), 128);
  const int64_t per_sm = lim.smem_per_sm > 0 ? lim.smem_per_sm : lim.smem_optin + 1024;
  int64_t best_resident = 0;
  for (int w = 1; w <= kMaxWarps; ++w) {
    const int64_t bytes = w * plan.warp_bytes;
    if (bytes > lim.smem_optin) break;
    int64_t blocks = per_sm / (bytes + 1024);  // 1 KB per block is reserved by the system
    if (blocks < 1) blocks = 1;
    const int64_t max_blocks = 2048 / (w * kWarpSize);  // thread limit per multiprocessor
    if (blocks > max_blocks) blocks = max_blocks;
    const int64_t resident = blocks * w;
    if (resident >= best_resident) {
      best_resident = resident;
      plan.warps = w;
      plan.smem_bytes = bytes;
      plan.ok = true;
    }
  }
  return plan;
}

// Two MMA accumulator sets of MT x NF fragments each: the message of field i goes to set (i & 1).
template <typename Mma, int NF, int MT>
struct AccSets {
  typename Mma::FragAcc even[MT][NF];
  typename Mma::FragAcc odd[MT][NF];
};

// acc[m][n] += h_i (rows 16m .. 16m+15, D) . W[i, j][:, 16n .. 16n+15]  for m < MT, n < NF, over
// the K steps of one field. Each weight fragment is loaded once and used by the MT row tiles.
template <typename Mma, typename T, int NF, int MT>
DAGFM_HD void mma_field(typename Mma::FragAcc (&acc)[MT][NF], const T* hi, int64_t ld, const T* wij) {
  constexpr int D = 16 * NF;
  constexpr int kSteps = D / Mma::kK;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int ks = 0; ks < kSteps; ++ks) {
    typename Mma::FragA a[MT];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int m = 0; m < MT; ++m) Mma::load_a(a[m], hi + m * kRows * ld + ks * Mma::kK, unsigned(ld));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int n = 0; n < NF; ++n) {
      typename Mma::FragB b;
      Mma::load_b(b, wij + ks * Mma::kK * D + n * 16, unsigned(D));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int m = 0; m < MT; ++m) Mma::mma(acc[m][n], a[m], b);
    }
  }
}

// Forward for the 16 * MT-sample tile starting at sample b0, run by one warp (`lane`: the warp's
// 32 lanes, or a team of one on the host). hbuf: 16 MT x ld elements of T; scratch: 16 MT x D
// floats. Writes states[b0 .. b0+nb-1, :, :] once; rows past the batch are computed on zeros, never
// stored.
template <typename Mma, typename T, int NF, int MT>
DAGFM_HD void forward_warp_tile(const PropagateParams<T>& prm, T* DAGFM_RESTRICT hbuf, int64_t ld,
                                float* DAGFM_RESTRICT scratch, int64_t b0, Team lane) {
  constexpr int D = 16 * NF;
  constexpr int kTileRows = kRows * MT;
  const int F = prm.num_fields, L = prm.depth;
  const int64_t FD = int64_t(F) * D;
  const int nb = int(imin64(kTileRows, prm.batch - b0));
  const int64_t srow = int64_t(L + 1) * F;  // states per sample
  const T* DAGFM_RESTRICT h0g = prm.h0 + b0 * FD;
  T* DAGFM_RESTRICT st = prm.states + b0 * srow;
  const int64_t layer_numel = FD * F * D;

  // h^0 into the state buffer (rows past the batch: zeros), and the states of t = 0.
  for (int64_t k = lane.rank; k < kTileRows * FD; k += lane.size) {
    const int64_t r = k / FD, c = k % FD;
    hbuf[r * ld + c] = r < nb ? h0g[k] : cvt<T>(0.0f);
  }
  for (int64_t k = lane.rank; k < int64_t(nb) * F; k += lane.size) {
    const int64_t r = k / F;
    const int j = int(k % F);
    const T* DAGFM_RESTRICT x = h0g + r * FD + int64_t(j) * D;
    float s = 0.0f;
    for (int d = 0; d < D; ++d) s += cvt<float>(x[d]);
    st[r * srow + j] = cvt<T>(s);
  }
  warp_sync();

  for (int t = 1; t <= L; ++t) {
    const T* DAGFM_RESTRICT w = prm.p + int64_t(t - 1) * layer_numel;
    for (int j = F - 1; j >= 0; --j) {
      AccSets<Mma, NF, MT> acc;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int m = 0; m < MT; ++m)
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int n = 0; n < NF; ++n) {
          Mma::fill_zero(acc.even[m][n]);
          Mma::fill_zero(acc.odd[m][n]);
        }
      const T* wj = w + int64_t(j) * D * D;  // W[0, j]; W[i, j] is i * F * D * D further
      const int64_t wstride = FD * D;
      int i = 0;
      for (; i + 1 <= j; i += 2) {
        mma_field<Mma, T, NF, MT>(acc.even, hbuf + int64_t(i) * D, ld, wj + int64_t(i) * wstride);
        mma_field<Mma, T, NF, MT>(acc.odd, hbuf + int64_t(i + 1) * D, ld, wj + int64_t(i + 1) * wstride);
      }
      if (i <= j) mma_field<Mma, T, NF, MT>(acc.even, hbuf + int64_t(i) * D, ld, wj + int64_t(i) * wstride);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int m = 0; m < MT; ++m)
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int n = 0; n < NF; ++n) {
          Mma::add(acc.even[m][n], acc.odd[m][n]);
          Mma::store(scratch + m * kRows * D + n * 16, acc.even[m][n], unsigned(D));
        }
      // Every lane's fragment loads of column j are done (their values fed the MMAs above):
      // after this barrier column j of hbuf may be overwritten.
      warp_sync();
      // h^t_j = h0_j * a^t_j: into scratch (float, for the state sums) and into hbuf column j;
      // a^t_j into the messages when a training forward keeps them.
      T* DAGFM_RESTRICT msg =
          prm.messages == nullptr ? nullptr : prm.messages + (b0 * L + (t - 1)) * FD + int64_t(j) * D;
      for (int k = lane.rank; k < kTileRows * D; k += lane.size) {
        const int r = k / D, c = k % D;
        if (msg != nullptr && r < nb) msg[int64_t(r) * L * FD + c] = cvt<T>(scratch[k]);
        const float x0 = r < nb ? cvt<float>(h0g[int64_t(r) * FD + int64_t(j) * D + c]) : 0.0f;
        const float v = x0 * scratch[k];
        scratch[k] = v;
        hbuf[int64_t(r) * ld + int64_t(j) * D + c] = cvt<T>(v);
      }
      warp_sync();
      // s^t_j per sample. Lane r reads row r starting at column r: the 16 lanes hit 16
      // different banks (D is a multiple of 16).
      for (int r = lane.rank; r < nb; r += lane.size) {
        float s = 0.0f;
        for (int c = 0; c < D; ++c) s += scratch[r * D + (c + r) % D];
        st[int64_t(r) * srow + int64_t(t) * F + j] = cvt<T>(s);
      }
      warp_sync();  // scratch is overwritten by the next column's store
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Device policy (nvcuda::wmma) and the kernel. Tensor cores with these types need sm_80+.

#if defined(__CUDACC__) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define DAGFM_HAS_WMMA_POLICIES 1

template <typename T>
struct WmmaPolicy;

// What every policy shares: 16 x 16 x K fragments of operand precision Prec, a float accumulator.
template <int K, typename Prec>
struct WmmaFragments {
  static constexpr int kK = K;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, K, Prec, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, K, Prec, nvcuda::wmma::row_major>;
  using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, K, float>;
  static __device__ __forceinline__ void fill_zero(FragAcc& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  static __device__ __forceinline__ void mma(FragAcc& c, const FragA& a, const FragB& b) {
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  static __device__ __forceinline__ void add(FragAcc& c, const FragAcc& o) {
#pragma unroll
    for (int k = 0; k < c.num_elements; ++k) c.x[k] += o.x[k];
  }
  static __device__ __forceinline__ void store(float* p, const FragAcc& c, unsigned ldm) {
    nvcuda::wmma::store_matrix_sync(p, c, ldm, nvcuda::wmma::mem_row_major);
  }
};

// float16 / bfloat16 operands: m16n16k16.
template <typename T>
struct WmmaHalfPolicy : WmmaFragments<16, T> {
  using Base = WmmaFragments<16, T>;
  static __device__ __forceinline__ void load_a(typename Base::FragA& a, const T* p, unsigned ldm) {
    nvcuda::wmma::load_matrix_sync(a, p, ldm);
  }
  static __device__ __forceinline__ void load_b(typename Base::FragB& b, const T* p, unsigned ldm) {
    nvcuda::wmma::load_matrix_sync(b, p, ldm);
  }
};

template <>
struct WmmaPolicy<__half> : WmmaHalfPolicy<__half> {};
template <>
struct WmmaPolicy<__nv_bfloat16> : WmmaHalfPolicy<__nv_bfloat16> {};

// float operands rounded to TF32: m16n16k8.
template <>
struct WmmaPolicy<float> : WmmaFragments<8, nvcuda::wmma::precision::tf32> {
  static __device__ __forceinline__ void load_a(FragA& a, const float* p, unsigned ldm) {
    nvcuda::wmma::load_matrix_sync(a, p, ldm);
#pragma unroll
    for (int k = 0; k < a.num_elements; ++k) a.x[k] = nvcuda::wmma::__float_to_tf32(a.x[k]);
  }
  static __device__ __forceinline__ void load_b(FragB& b, const float* p, unsigned ldm) {
    nvcuda::wmma::load_matrix_sync(b, p, ldm);
#pragma unroll
    for (int k = 0; k < b.num_elements; ++k) b.x[k] = nvcuda::wmma::__float_to_tf32(b.x[k]);
  }
};
#endif

#if defined(__CUDACC__)

extern __shared__ __align__(128) unsigned char dagfm_tc_smem[];

// One warp per 16-sample tile, tiles handed out round-robin over the grid's warps (a persistent
// grid). Launched with plan.warps * 32 threads and plan.smem_bytes of dynamic shared memory.
// Requirements checked by the launcher: compute capability 8.0+, D = 16 * NF, p 32-byte aligned.
template <typename T, int NF, int MT>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    forward_kernel_interaction(PropagateParams<T> prm, int64_t ld, int64_t state_bytes, int64_t warp_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int warp = int(threadIdx.x) / kWarpSize;
  const int nwarps = int(blockDim.x) / kWarpSize;
  unsigned char* slice = dagfm_tc_smem + warp * warp_bytes;
  T* hbuf = reinterpret_cast<T*>(slice);
  float* scratch = reinterpret_cast<float*>(slice + state_bytes);
  const int64_t tiles = ceil_div64(prm.batch, kRows * MT);
  const Team lane{int(threadIdx.x) % kWarpSize, kWarpSize};
  for (int64_t tile = int64_t(blockIdx.x) * nwarps + warp; tile < tiles; tile += int64_t(gridDim.x) * nwarps)
    forward_warp_tile<WmmaPolicy<T>, T, NF, MT>(prm, hbuf, ld, scratch, tile * kRows * MT, lane);
#else
  (void)prm;
  (void)ld;
  (void)state_bytes;
  (void)warp_bytes;
  __trap();  // the launcher never picks this kernel below sm_80
#endif
}

#endif  // __CUDACC__

}  // namespace tc
}  // namespace cuda
}  // namespace dagfm
