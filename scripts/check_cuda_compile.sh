#!/usr/bin/env bash
# Compile-checks the torch-free CUDA kernel headers with plain nvcc (no torch, no GPU), for sm_80
# and sm_90, warnings as errors, every dtype (float, double, half, bfloat16); then builds and runs
# the host tests of their tile arithmetic (tests/cuda_host/*_host_test.cpp) with the host compiler. Exits non-zero on any failure;
# a no-op with a message when nvcc is absent. Usage: scripts/check_cuda_compile.sh [out_dir]
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
# CUDA-core kernels' tile arithmetic, tc_host_test the tensor-core forward's tile algorithm,
# rb_host_test the register-blocked forward.
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
headers=("$ROOT"/csrc/cuda/*.cuh)
if [[ ${#headers[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no headers under csrc/cuda" >&2
  exit 1
fi

# One translation unit per header, with explicit instantiations of every kernel in it where we
# know them (templates that are never instantiated are barely checked).
for header in "${headers[@]}"; do
  name="$(basename "$header" .cuh)"
  tu="$WORK/check_${name}.cu"
  {
    echo "#include \"cuda/$(basename "$header")\""
    if [[ "$name" == "dagfm_kernels" ]]; then
      cat <<'EOF'
namespace dagfm {
namespace cuda {
#define DAGFM_CHECK_KERNELS(K, T, Acc)                                                            \
  template __global__ void propagate_fwd_kernel<K, T, Acc>(PropagateParams<T>, TileConfig, Acc*, \
                                                           int64_t);                              \
  template __global__ void propagate_bwd_kernel<K, T, Acc>(PropagateBackwardParams<T>,           \
                                                           TileConfig, Acc*, int64_t);
#define DAGFM_CHECK_TYPES(T, Acc)                                   \
  DAGFM_CHECK_KERNELS(Interaction::Inner, T, Acc)                   \
  DAGFM_CHECK_KERNELS(Interaction::Outer, T, Acc)                   \
  DAGFM_CHECK_KERNELS(Interaction::Kernel, T, Acc)                  \
  template __global__ void reduce_weight_grad_kernel<T, Acc>(const Acc*, int64_t, int64_t, int64_t, \
                                                             int, int64_t, int64_t, T*);
DAGFM_CHECK_TYPES(float, float)
DAGFM_CHECK_TYPES(double, double)
DAGFM_CHECK_TYPES(__half, float)
DAGFM_CHECK_TYPES(__nv_bfloat16, float)
}  // namespace cuda
}  // namespace dagfm
EOF
    elif [[ "$name" == "dagfm_rb" ]]; then
      cat <<'EOF'
namespace dagfm {
namespace cuda {
namespace rb {
#define DAGFM_CHECK_RB(K, T, Acc)                                                        \
  template __global__ void forward_kernel<K, 4, T, Acc>(PropagateParams<T>, RbConfig); \
  template __global__ void forward_kernel<K, 8, T, Acc>(PropagateParams<T>, RbConfig);
#define DAGFM_CHECK_RB_TYPES(T, Acc)               \
  DAGFM_CHECK_RB(Interaction::Inner, T, Acc)       \
  DAGFM_CHECK_RB(Interaction::Outer, T, Acc)
#define DAGFM_CHECK_RB_ALL(T, Acc)                                                      \
  DAGFM_CHECK_RB_TYPES(T, Acc)                                                          \
  template __global__ void kernel_forward_kernel<4, T, Acc>(PropagateParams<T>, RbConfig); \
  template __global__ void kernel_forward_kernel<8, T, Acc>(PropagateParams<T>, RbConfig); \
  template __global__ void inner_backward_kernel<T, Acc>(PropagateBackwardParams<T>, InnerBwdArgs, RbConfig);
DAGFM_CHECK_RB_ALL(float, float)
DAGFM_CHECK_RB_ALL(double, double)
DAGFM_CHECK_RB_ALL(__half, float)
DAGFM_CHECK_RB_ALL(__nv_bfloat16, float)
}  // namespace rb
}  // namespace cuda
}  // namespace dagfm
EOF
    elif [[ "$name" == "dagfm_tc" ]]; then
      cat <<'EOF'
namespace dagfm {
namespace cuda {
namespace tc {
#define DAGFM_CHECK_TC(T)                                                                       \
  template __global__ void kernel_fwd_tc_kernel<T, 1, 1>(PropagateParams<T>, int64_t, int64_t, int64_t); \
  template __global__ void kernel_fwd_tc_kernel<T, 2, 1>(PropagateParams<T>, int64_t, int64_t, int64_t); \
  template __global__ void kernel_fwd_tc_kernel<T, 3, 1>(PropagateParams<T>, int64_t, int64_t, int64_t); \
  template __global__ void kernel_fwd_tc_kernel<T, 4, 1>(PropagateParams<T>, int64_t, int64_t, int64_t); \
  template __global__ void kernel_fwd_tc_kernel<T, 1, 2>(PropagateParams<T>, int64_t, int64_t, int64_t); \
  template __global__ void kernel_fwd_tc_kernel<T, 2, 2>(PropagateParams<T>, int64_t, int64_t, int64_t);
DAGFM_CHECK_TC(float)
DAGFM_CHECK_TC(__half)
DAGFM_CHECK_TC(__nv_bfloat16)
}  // namespace tc
}  // namespace cuda
}  // namespace dagfm
EOF
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
