// Which vector loops a CPU call runs: AVX-512, AVX2+FMA or portable, picked once per process from
// the CPU (DAGFM_CPU_ISA=avx512|avx2|generic lowers it), and the embedding sizes compiled with D
// fixed.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cpu_features.h"

namespace dagfm {

inline CpuIsa detect_isa() {
  CpuIsa best = supported_isa();
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
