// Which vector loops a CPU call runs: AVX-512, AVX2+FMA or portable, picked once per process from
// the CPU (DAGFM_CPU_ISA=avx512|avx2|generic lowers it), and the embedding sizes compiled with D
// fixed.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

// The tile loops are compiled three times: portable, AVX2+FMA and AVX-512; cpu_isa() picks one.
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

inline CpuIsa detect_isa() {
  CpuIsa best = CpuIsa::Generic;
#if DAGFM_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = CpuIsa::Avx512;
#endif
  // DAGFM_CPU_ISA may lower the choice (never raise it above what the CPU has).
  if (const char* env = std::getenv("DAGFM_CPU_ISA")) {
    const std::string want(env);
    const CpuIsa asked = want == "avx512" ? CpuIsa::Avx512 : want == "avx2" ? CpuIsa::Avx2 : CpuIsa::Generic;
    TORCH_CHECK(want == "avx512" || want == "avx2" || want == "generic",
                "DAGFM_CPU_ISA: expected one of 'avx512', 'avx2', 'generic', got '", want, "'");
    best = std::min(best, asked);
  }
  return best;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

// Calls f.template operator()<kD>() with D fixed at compile time for the common embedding sizes.
template <typename Fn>
void with_static_embed_dim(int D, Fn&& f) {
  switch (D) {
    case 4: f.template operator()<4>(); break;
    case 8: f.template operator()<8>(); break;
    case 16: f.template operator()<16>(); break;
    case 32: f.template operator()<32>(); break;
    default: f.template operator()<0>(); break;
  }
}

}  // namespace dagfm
