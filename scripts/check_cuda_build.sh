#!/usr/bin/env bash
# Builds and links the full extension (C++ and CUDA) against a CUDA build of torch, without a
# GPU, in a copy of the tree and a separate virtual environment, then checks the CUDA kernels are
# registered. Usage: scripts/check_cuda_build.sh   (VENV_CUDA, TORCH_CUDA_VERSION to override)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_CUDA="${VENV_CUDA:-$ROOT/.venv-cuda}"
TORCH_CUDA_VERSION="${TORCH_CUDA_VERSION:-2.14.1}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [[ ! -x "$VENV_CUDA/bin/python" ]]; then
  python3 -m venv "$VENV_CUDA"
  "$VENV_CUDA/bin/python" -m pip install -q --upgrade pip
fi
"$VENV_CUDA/bin/python" -m pip install -q "torch==$TORCH_CUDA_VERSION" numpy ninja "setuptools>=77" wheel
"$VENV_CUDA/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch is not a CUDA build")'

# torch guesses CUDA_HOME from nvcc's folder, which is wrong when nvcc is a wrapper script.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [[ -x "$c/bin/nvcc" ]]; then export CUDA_HOME="$c"; break; fi
  done
fi
# The toolkit may lack library headers (cusparse.h, ...) that the CUDA wheels beside torch carry.
site="$("$VENV_CUDA/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[[ -d "$site/nvidia/cu13/include" ]] && export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"

tar -C "$ROOT" --exclude=./.venv --exclude=./.venv-cuda --exclude=./build --exclude=./build-cmake \
  --exclude='*.so' -cf - . | tar -C "$WORK" -xf -
cd "$WORK"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" DAGFM_USE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV_CUDA/bin/python" setup.py -q build_ext --inplace
"$VENV_CUDA/bin/python" - <<'PY'
import torch
import dagfm_ext
info = dagfm_ext.build_info()
assert info["cuda"], info
for op in ("propagate_fwd", "propagate_fwd_train", "propagate_sum_fwd", "propagate_sum_fwd_train",
           "propagate_bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dagfm_ext::{op}", "CUDA"), op
print("check_cuda_build: CUDA kernels built and registered:", info)
PY
