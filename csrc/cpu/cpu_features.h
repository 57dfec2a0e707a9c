// The vector instruction sets this CPU runs (AVX-512, AVX2+FMA or neither) and the target attributes
// that compile a loop for each. Free of torch: the op (isa.h) and the stand-alone kernel benchmark
// both probe the CPU here.
#pragma once

// The tile loops are compiled three times: portable, AVX2+FMA and AVX-512.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DAGFM_X86_DISPATCH 1
#define DAGFM_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define DAGFM_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define DAGFM_X86_DISPATCH 0
#endif

namespace dagfm {

enum class CpuIsa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

inline const char* isa_name(CpuIsa isa) {
  return isa == CpuIsa::Avx512 ? "avx512" : isa == CpuIsa::Avx2 ? "avx2" : "generic";
}

// The widest set whose loops this CPU runs (the AVX-512 loops need F, BW, DQ and VL).
inline CpuIsa supported_isa() {
  CpuIsa best = CpuIsa::Generic;
#if DAGFM_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = CpuIsa::Avx512;
#endif
  return best;
}

}  // namespace dagfm
