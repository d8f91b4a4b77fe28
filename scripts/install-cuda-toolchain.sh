#!/usr/bin/env bash
# Installs the pinned nvcc 13.0 toolchain from PyPI wheels into a project-local
# venv (.cuda-toolchain/), so kernels compile on machines without a CUDA
# install or a GPU. Idempotent: when the pinned set is already present it only
# prints the nvcc path.
#
# Why these pins: the GPU machines run driver 580 (CUDA 13.0). Unpinned
# nvvm/crt resolve to a newer release whose PTX ptxas 13.0 rejects
# ("Unsupported .version"). cccl supplies <nv/target>, needed by cuda_bf16.h.
# cuobjdump/nvdisasm read the compiled SASS (HMMA = tensor cores).
#
# Usage: scripts/install-cuda-toolchain.sh [--if-missing] [DIR]   (default: <repo>/.cuda-toolchain)
# --if-missing: do nothing when build.rs would already find an nvcc ($NVCC,
# $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin, /opt/cuda/bin);
# the README's first command uses it, so a machine with CUDA keeps its own.
# Prints the absolute path of nvcc on its last line.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if_missing=0
if [ "${1:-}" = "--if-missing" ]; then
  if_missing=1
  shift
fi
venv="${1:-$repo_root/.cuda-toolchain}"

if [ "$if_missing" = 1 ]; then
  # The same places as build/nvcc.rs, minus the pinned toolchain (below).
  for candidate in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
    "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc /opt/cuda/bin/nvcc; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then
      echo "nvcc found at $candidate; nothing to install" >&2
      echo "$candidate"
      exit 0
    fi
  done
fi
pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  # SASS readers for the tensor-core proof (scripts/check-tensor-cores.sh,
  # `vppo-engine info`): no 13.0 release exists; 13.2.51 reads nvcc 13.0
  # fatbins and installs beside nvcc (nvidia/cu13/bin).
  "nvidia-cuda-cuobjdump==13.2.51"
  "nvidia-cuda-nvdisasm==13.2.51"
)
stamp="$venv/.vppo-pins"
wanted="$(printf '%s\n' "${pins[@]}")"

find_nvcc() {
  # Call nvcc by its real path: a symlink breaks its relative include paths.
  local candidate
  for candidate in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && nvcc_path="$(find_nvcc)"; then
  echo "cuda toolchain already installed in $venv" >&2
  echo "$nvcc_path"
  exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found; the CUDA toolchain is installed from PyPI wheels and needs Python 3" >&2
  exit 1
fi

echo "installing pinned nvcc 13.0 wheels into $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
nvcc_path="$(find_nvcc)" || {
  echo "error: the wheels installed but no nvcc was found under $venv" >&2
  exit 1
}
"$nvcc_path" --version >&2
echo "$wanted" >"$stamp"
echo "$nvcc_path"
