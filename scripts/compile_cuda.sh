#!/usr/bin/env bash
# Compile check of the CUDA sources, no GPU needed: every csrc/cuda/*.cu with nvcc for sm_80 and sm_90
# (the flags setup.py uses), and the host entries (csrc/ops.cpp with SPIKEOPS_WITH_CUDA) with
# g++ -fsyntax-only against the torch and CUDA headers. Exits non-zero on any error. Without any
# nvcc it says so and exits 0.
#
# Usage: scripts/compile_cuda.sh        (from anywhere; CUDA_HOME picks the toolkit)
set -uo pipefail
cd "$(dirname "$0")/.."

nvcc=""
if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME}/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  nvcc="$(command -v nvcc)"
fi
if [[ -z "$nvcc" ]]; then
  echo "compile_cuda: no nvcc (\$CUDA_HOME/bin/nvcc or on PATH): CUDA sources NOT checked"
  exit 0
fi
# The runtime headers for g++: ask nvcc where they are (a wrapper script may stand on PATH).
cuda_include="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 |
  sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
if [[ -z "$cuda_include" || ! -f "$cuda_include/cuda_runtime_api.h" ]]; then
  cuda_include="$(dirname "$(dirname "$(readlink -f "$nvcc")")")/include"
fi
echo "compile_cuda: $("$nvcc" --version | tail -n 1), runtime headers in $cuda_include"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failed=0

for src in csrc/cuda/*.cu; do
  echo "nvcc  $src"
  if ! "$nvcc" -c "$src" -o "$tmp/$(basename "$src").o" -I csrc -std=c++17 -O3 \
      --fmad=false -lineinfo -DSPIKEOPS_WITH_CUDA \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      --threads 0 -Xcompiler -Wall; then
    echo "compile_cuda: FAILED $src"
    failed=1
  fi
done

python="$(command -v python || command -v python3)"
if ! torch_includes="$("$python" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')"; then
  echo "compile_cuda: cannot import torch for its include paths"
  exit 1
fi
# ops.cpp is also the Python module's entry point: it needs Python.h.
include_flags=(-isystem "$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')")
# -isystem: warnings inside torch's headers are torch's, not ours.
while IFS= read -r dir; do include_flags+=(-isystem "$dir"); done <<< "$torch_includes"
# A CPU-only torch wheel ships the c10/cuda headers without the generated
# c10/cuda/impl/cuda_cmake_macros.h; the syntax check does not need it.
if [[ ! -f "$(head -n 1 <<< "$torch_includes")/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  include_flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
for src in csrc/ops.cpp; do
  echo "g++   $src"
  if ! g++ -fsyntax-only -std=c++17 -Wall -DSPIKEOPS_WITH_CUDA -I csrc \
      "${include_flags[@]}" -isystem "$cuda_include" "$src"; then
    echo "compile_cuda: FAILED $src"
    failed=1
  fi
done

if (( failed )); then
  echo "compile_cuda: errors above"
  exit 1
fi
echo "compile_cuda: all CUDA sources compile"
