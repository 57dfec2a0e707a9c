// What every CUDA algorithm here shares: storage-type conversions, the team abstraction that lets
// the same arithmetic run on a CUDA block or on one host thread (the host tests), index helpers of
// the packed upper triangle, the device limits the planners read, and the dynamic shared-memory
// symbol. No torch includes: plain nvcc and the host compiler both build it (see docs/cuda.md).
#pragma once

#include <cstdint>

#include "../dagfm_math.h"
#include "../dagfm_params.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace dagfm {
namespace cuda {

// Conversions between the storage type T and the accumulator type. Explicit intrinsics for the
// 16-bit types: torch builds its CUDA sources with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove __half's and __nv_bfloat16's implicit conversions.
// Storage is __half / __nv_bfloat16 for float16 / bfloat16, always with a float accumulator.
template <typename To, typename From>
DAGFM_HD To cvt(From x) {
  return static_cast<To>(x);
}
#if defined(__CUDACC__)
template <>
DAGFM_HD float cvt<float, __half>(__half x) {
  return __half2float(x);
}
template <>
DAGFM_HD __half cvt<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
DAGFM_HD float cvt<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
DAGFM_HD __nv_bfloat16 cvt<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

// <w, h> over D with w in storage type T and h in Acc (dagfm_math.h's dot, through cvt).
template <typename Acc, typename T>
DAGFM_HD Acc dot_cvt(const T* DAGFM_RESTRICT w, const Acc* DAGFM_RESTRICT h, int D) {
  Acc s = Acc(0);
  for (int d = 0; d < D; ++d) s += cvt<Acc>(w[d]) * h[d];
  return s;
}

// A team of threads cooperating on one tile: the CUDA block, or one host thread in the tests.
struct Team {
  int rank;
  int size;
};

DAGFM_HD void team_sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#endif
}

DAGFM_HD int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }
DAGFM_HD int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Packed (row-major) index of edge (i, i) in the upper triangle; row i holds F - i edges.
DAGFM_HD int64_t row_start(int i, int F) { return int64_t(i) * F - int64_t(i) * (i - 1) / 2; }
DAGFM_HD int64_t num_edges(int F) { return int64_t(F) * (F + 1) / 2; }

// The device properties a planner needs; plain numbers so that the host tests can make them up.
struct DeviceLimits {
  int64_t smem_optin = 48 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int num_sms = 1;
  int64_t smem_per_sm = 0;         // cudaDevAttrMaxSharedMemoryPerMultiprocessor (0: unknown)
  int cc_major = 0;                // compute capability (0: unknown; tensor-core paths need 8+)
};

#if defined(__CUDACC__)
// Dynamic shared memory of the CUDA-core kernels (each kernel carves its own layout from it).
extern __shared__ __align__(16) unsigned char dagfm_smem[];
#endif

}  // namespace cuda
}  // namespace dagfm
