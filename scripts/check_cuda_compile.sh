#!/usr/bin/env bash
# Builds and runs the host tests of the CUDA code (tests/cuda_host/*_host_test.cpp) with the host
# compiler, then compile-checks every torch-free CUDA header with plain nvcc (no torch, no GPU) for
# sm_80 and sm_90, warnings as errors, every kernel instantiated as the build instantiates it
# (csrc/cuda/instantiations.h). Exits non-zero on any failure; skips the nvcc part with a message
# when nvcc is absent. Usage: scripts/check_cuda_compile.sh [out_dir]
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
    NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  fi
fi
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
status=0

# The host tests need no CUDA at all: run them even without nvcc. tile_host_test checks the
# one-output-per-thread kernels' tile arithmetic, tc_host_test the tensor-core forward's tile
# algorithm, rb_host_test the register-blocked algorithms, path_host_test the path selection and
# the switches.
CXX="${CXX:-g++}"
if command -v "$CXX" >/dev/null 2>&1; then
  for src in "$ROOT"/tests/cuda_host/*_host_test.cpp; do
    name="$(basename "$src" .cpp)"
    if "$CXX" -std=c++17 -O1 -fopenmp-simd -Wall -Wextra -Werror -I "$ROOT/csrc" \
        "$src" -o "$WORK/$name" && "$WORK/$name"; then
      echo "check_cuda_compile: host test $name passed"
    else
      echo "check_cuda_compile: FAILED host test $name" >&2
      status=1
    fi
  done
else
  echo "check_cuda_compile: no host compiler ($CXX), skipping the host tests"
fi

if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found, skipping the CUDA compile check"
  exit "$status"
fi
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"

shopt -s nullglob
# Every header without torch: the algorithms (.cuh) and the path selection (host code that nvcc
# must also accept, since the launch code includes it).
headers=("$ROOT"/csrc/cuda/*.cuh "$ROOT/csrc/cuda/path_selection.h")
if [[ ${#headers[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no headers under csrc/cuda" >&2
  exit 1
fi

# One translation unit per header. A header that defines kernels has them all instantiated, through
# its DAGFM_INSTANTIATE_<HEADER> macro of csrc/cuda/instantiations.h (the list the build uses too;
# templates that are never instantiated are barely checked); a header with kernels and no macro
# fails the check.
for header in "${headers[@]}"; do
  name="$(basename "$header")"
  name="${name%.*}"
  macro="DAGFM_INSTANTIATE_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
  tu="$WORK/check_${name}.cu"
  {
    echo "#include \"cuda/$(basename "$header")\""
    if grep -q '__global__' "$header"; then
      if ! grep -q "define ${macro}()" "$ROOT/csrc/cuda/instantiations.h"; then
        echo "check_cuda_compile: $(basename "$header") defines kernels but instantiations.h has no ${macro}()" >&2
        status=1
      fi
      echo '#include "cuda/instantiations.h"'
      echo "${macro}()"
    fi
  } >"$tu"
  for arch in 80 90; do
    log="$WORK/check_${name}_sm${arch}.log"
    # The __CUDA_NO_*_CONVERSIONS__ flags are the ones torch's extension build passes: they
    # remove __half's implicit conversions, which the kernels must therefore never rely on.
    if "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
        -gencode "arch=compute_${arch},code=sm_${arch}" -Xptxas -v -Xcompiler -Wall,-Wextra \
        -I "$ROOT/csrc" -c "$tu" -o "$WORK/check_${name}_sm${arch}.o" >"$log" 2>&1; then
      # ptxas -v goes to the log; flag local-memory use (spills, stack frames) without failing.
      spills="$(grep -c 'bytes spill stores' "$log" | tr -d ' ')"
      nonzero="$(grep -E '[1-9][0-9]* bytes (stack frame|spill stores)' "$log" | grep -vc ' 0 bytes stack frame, 0 bytes spill' || true)"
      echo "check_cuda_compile: OK $(basename "$header") sm_${arch} (${spills} functions, ${nonzero} with local memory; log $log)"
    else
      echo "check_cuda_compile: FAILED $(basename "$header") sm_${arch}:" >&2
      cat "$log" >&2
      status=1
    fi
  done
done
exit "$status"
