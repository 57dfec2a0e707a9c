#!/usr/bin/env bash
# One prepared command for a machine with a GPU (what it checks: docs/cuda.md). From the
# repository root:
#     scripts/gpu_check.sh            # build, tests, sanitizers, benchmarks (about 8-9 minutes)
#     scripts/gpu_check.sh --sweep    # build, then only the F x D tuning grid (bench_tc --sweep)
# Builds the extension in place for sm_90 (TORCH_CUDA_ARCH_LIST overrides), compile-checks the
# kernel headers and runs their host tests, runs every test (the CUDA ones first: float32/64,
# float16/bfloat16, TF32, every forward and backward path, the DAGFM_CUDA_* switches; not stopping
# at the first failure, up to 30 failures listed in the summary), the low-precision / tensor-core
# benchmark (scripts/bench_tc.py), compute-sanitizer memcheck and racecheck on a small case (every
# dtype, the tensor-core forward too), and the float32 benchmark table. Logs go under $OUT
# (./gpu_out when OUT is unset); at the end they are bundled so that at most 8 files remain there
# (the device tool returns no more): summary.txt, the two benchmark JSONs, pytest.log, bench_tc.log
# and gpu_check_logs.tar.gz with everything. Each step runs even when an earlier one failed; the
# script exits non-zero when any step failed. Whole run bounded by GPU_CHECK_BUDGET_S (570 s; give
# the device tool a timeout of 600 s).
set -uo pipefail
MODE="check"
if [[ "${1:-}" == "--sweep" ]]; then
  MODE="sweep"
elif [[ -n "${1:-}" ]]; then
  echo "usage: scripts/gpu_check.sh [--sweep]" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-570}))
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export DAGFM_USE_CUDA=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Toolkit location: torch guesses CUDA_HOME from nvcc's folder, wrong when nvcc is a wrapper
# script in /usr/local/bin (then -lcudart is not found at link time).
if [[ -z "${CUDA_HOME:-}" ]]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
    if [[ -x "$c/bin/nvcc" ]]; then export CUDA_HOME="$c"; break; fi
  done
fi
# Some toolkits lack the library headers torch's CUDA headers include (cusparse.h, ...); the
# nvidia-* wheels beside torch carry them.
if [[ -n "${CUDA_HOME:-}" && ! -f "$CUDA_HOME/include/cusparse.h" ]]; then
  wheel_inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/nvidia/cu13/include"
  [[ -d "$wheel_inc" ]] && export CPATH="$wheel_inc${CPATH:+:$CPATH}"
fi
SANITIZER="$(command -v compute-sanitizer || true)"
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  [[ -z "$SANITIZER" && -x "$c" ]] && SANITIZER="$c"
done

declare -a SUMMARY=()
FAILED=0

# step NAME CAP_S RESERVE_S COMMAND: runs COMMAND (a bash string) with its output in $OUT/NAME.log,
# for at most CAP_S seconds and never into the RESERVE_S seconds kept for the later steps.
step() {
  local name="$1" cap="$2" reserve="$3" cmd="$4"
  local now left limit t0 rc
  now=$(date +%s)
  left=$((DEADLINE - now - reserve))
  limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-14s SKIPPED (out of time)' "$name")")
    FAILED=1
    echo "== $name: skipped, out of time"
    return
  fi
  echo "== $name (limit ${limit}s): $cmd"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  local verdict="ok"
  if ((rc == 124 || rc == 137)); then
    verdict="FAILED (timed out after ${limit}s)"
  elif ((rc != 0)); then
    verdict="FAILED (exit $rc)"
  fi
  [[ "$verdict" != ok ]] && FAILED=1
  SUMMARY+=("$(printf '%-14s %-34s %4ss  %s' "$name" "$verdict" "$took" "$OUT/$name.log")")
  echo "   $verdict in ${took}s"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -n 2
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
  "$PY" -c 'import setuptools, sys; print("python", sys.version.split()[0], "setuptools", setuptools.__version__)' 2>&1
  echo "CUDA_HOME=${CUDA_HOME:-} CPATH=${CPATH:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS sanitizer=${SANITIZER:-none}"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -n 20
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# Reserves: what the later steps need at least (smoke and compile 15 each, pytest 90, bench_tc 60, memcheck 45,
# racecheck 30, bench 45).
# setuptools older than 77 rejects pyproject.toml's SPDX license string; setup.py needs none of
# pyproject's metadata to build the extension in place, so such a setuptools builds a copy without it.
if "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
  BUILD_EXT="'$PY' setup.py build_ext --inplace"
else
  BUILD_EXT="tmp=\$(mktemp -d) && tar --exclude=./pyproject.toml --exclude=./.git --exclude=./gpu_out -cf - . | tar -C \$tmp -xf - && (cd \$tmp && '$PY' setup.py build_ext --inplace) && cp \$tmp/dagfm_ext/_C*.so dagfm_ext/"
fi
BUILD_CMD="$BUILD_EXT && '$PY' -c 'import torch, dagfm_ext; info = dagfm_ext.build_info(); print(info); assert info[\"cuda\"], \"built without CUDA\"'"
if [[ "$MODE" == "sweep" ]]; then
  step build 240 200 "$BUILD_CMD"
  step sweep 600 0 "'$PY' scripts/bench_tc.py --sweep --json '$OUT/sweep.json'"
else
  step build 240 285 "$BUILD_CMD"
  # Every forward / backward path once, one ok/FAIL line each, before anything else can cascade.
  step smoke 60 270 "'$PY' scripts/sanitizer_case.py"
  # The compile check's objects and logs stay out of $OUT (the tool returns 8 files at most).
  step compile_check 60 270 "scripts/check_cuda_compile.sh '$(mktemp -d)'"
  pytest_extra=""
  "$PY" -c 'import pytest_timeout' >/dev/null 2>&1 && pytest_extra="--timeout=120"
  # Not -x: the CUDA code is new to the GPU, and one run should show every failure it can.
  step pytest 300 180 "'$PY' -m pytest tests/test_cuda.py tests/test_propagate.py tests -q -rfEs --maxfail=30 $pytest_extra"
  # float16 / bfloat16 / TF32 against exact float32, eager and torch.compile, with measured ceilings.
  step bench_tc 150 120 "'$PY' scripts/bench_tc.py --json '$OUT/bench_tc.json'"
  
  if [[ -n "$SANITIZER" ]]; then
    # No caching allocator under memcheck: every tensor is its own allocation, so an access past
    # the end of one is caught instead of landing in a neighbour inside a cached block.
    step memcheck 120 75 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool memcheck --error-exitcode 3 --leak-check no '$PY' scripts/sanitizer_case.py && grep -q 'ERROR SUMMARY: 0 errors' '$OUT/memcheck.log'"
    # racecheck looks at shared memory, which only the on-chip path uses.
    step racecheck 90 45 "'$SANITIZER' --tool racecheck --racecheck-report all --error-exitcode 3 '$PY' scripts/sanitizer_case.py --fast-only && grep -qE 'RACECHECK SUMMARY: 0 hazards|ERROR SUMMARY: 0 errors' '$OUT/racecheck.log'"
  else
    SUMMARY+=("$(printf '%-14s FAILED (compute-sanitizer not found)' sanitizer)")
    FAILED=1
  fi
  
  # Guarded on the source, not on `bench --help`: a bench that exists but fails must show as failed.
  if [[ -f dagfm_ext/__main__.py ]] && grep -q '"bench"' dagfm_ext/cli.py 2>/dev/null; then
    step bench 120 0 "'$PY' -m dagfm_ext bench --device cuda --json '$OUT/bench_cuda.json'"
  else
    SUMMARY+=("$(printf '%-14s SKIPPED (no \"python -m dagfm_ext bench\" in this tree)' bench)")
  fi
fi  # MODE

echo
echo "================ gpu_check summary ($(($(date +%s) - START))s, logs in $OUT)"
grep -hE '^(=+ )?[0-9]+ (passed|failed)|passed|failed|error' "$OUT/pytest.log" 2>/dev/null | tail -n 1 | sed 's/^/pytest: /'
grep -hE '^(FAILED|ERROR) ' "$OUT/pytest.log" 2>/dev/null | head -n 30 | cut -c1-200
grep -h '^FAIL' "$OUT/smoke.log" 2>/dev/null | head -n 20 | sed 's/^/smoke: /'
[[ -f "$OUT/bench_tc.log" ]] && { echo "--- low precision / tensor cores (tail of $OUT/bench_tc.log)"; sed -n '/bench_tc summary/,$p' "$OUT/bench_tc.log" | tail -n 40; }
[[ -f "$OUT/bench.log" ]] && { echo "--- benchmark (tail of $OUT/bench.log)"; tail -n 25 "$OUT/bench.log"; }
[[ -f "$OUT/sweep.log" ]] && { echo "--- sweep (tail of $OUT/sweep.log)"; sed -n '/sweep summary/,$p' "$OUT/sweep.log" | tail -n 45; }
echo "---"
for line in "${SUMMARY[@]}"; do echo "$line"; done
verdict="gpu_check: all steps passed"
((FAILED)) && verdict="gpu_check: FAILED"
echo "$verdict"
# Bundle: everything into one archive, and keep only a few files beside it (8 at most come back).
{
  cat "$OUT/env.log"
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  echo "$verdict"
} >"$OUT/summary.txt" 2>/dev/null
tar -C "$OUT" -czf "$ROOT/.gpu_check_logs.tar.gz" --exclude=gpu_check_logs.tar.gz . 2>/dev/null &&
  mv "$ROOT/.gpu_check_logs.tar.gz" "$OUT/gpu_check_logs.tar.gz"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.txt ! -name gpu_check_logs.tar.gz ! -name pytest.log \
  ! -name bench_tc.log ! -name bench_tc.json ! -name bench_cuda.json ! -name sweep.log ! -name sweep.json \
  -exec rm -rf {} +
((FAILED)) && exit 1
exit 0
