#!/usr/bin/env bash
# The whole check on a GPU machine (torch with CUDA, nvcc, no network): clean CUDA build, GPU
# facts, the test suite, the benchmarks and their report, compute-sanitizer memcheck on the small
# CUDA tests (last, time-bounded by SANITIZER_TIMEOUT seconds, default 300).
# Every step runs even after a failed one; each step's exit code goes to OUTDIR/summary.txt and
# the script exits non-zero if any step failed.
#
# Usage: scripts/gpu_check.sh OUTDIR
# OUTDIR receives at most 8 files: summary.txt build.txt gpu.txt pytest.txt sanitizer.txt
# bench.txt bench.json report.md.
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
summary="$out/summary.txt"
: > "$summary"
failed=0

# step NAME COMMAND...: runs the command, records and prints its exit code.
step() {
  local name="$1"
  shift
  echo "=== [$(date +%H:%M:%S)] $name"
  "$@"
  local rc=$?
  echo "$name $rc" >> "$summary"
  echo "=== [$(date +%H:%M:%S)] $name: exit $rc"
  if (( rc != 0 )); then failed=1; fi
  return 0
}

build() {
  rm -rf build python/spikeops/_C*.so
  SPIKEOPS_CUDA=1 pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$out/build.txt"
}

gpu_facts() {
  {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
      --format=csv
    python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
import spikeops  # noqa: F401  (registers the ops)
registered = torch._C._dispatch_has_kernel_for_dispatch_key("spikeops::spike_linear", "CUDA")
print("spikeops CUDA kernels registered:", registered)
raise SystemExit(0 if registered else 1)
PY
  } 2>&1 | tee "$out/gpu.txt"
}

tests() {
  python -m pytest tests -q -rs 2>&1 | tee "$out/pytest.txt"
}

sanitizer() {
  local tool
  tool="$(command -v compute-sanitizer || true)"
  if [[ -z "$tool" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then
    tool="$CUDA_HOME/bin/compute-sanitizer"
  fi
  if [[ -z "$tool" ]]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)" | tee "$out/sanitizer.txt"
    return 1
  fi
  # Without the caching allocator every tensor is its own allocation, so memcheck sees reads
  # past the end of a tensor instead of into a neighbour in the same pool block.
  # Small cases only (memcheck slows kernels 10-100x), bounded so the step cannot eat the
  # rest of a device session: it runs last.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZER_TIMEOUT:-300}" "$tool" --tool memcheck \
    --error-exitcode 97 python -m pytest tests -q -k "cuda and not 4096 and not 4128" 2>&1 |
    tee "$out/sanitizer.txt"
}

benchmarks() {
  python -m pytest bench -q --benchmark-json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
  local rc=${PIPESTATUS[0]}
  if (( rc == 5 )); then  # pytest: no tests collected, a failure here
    echo "no benchmarks collected under bench/" | tee -a "$out/bench.txt"
  fi
  return "$rc"
}

report() {
  if [[ ! -f bench/report.py ]]; then
    echo "bench/report.py absent: no report"
    return 0
  fi
  if [[ ! -f "$out/bench.json" ]]; then
    echo "no bench.json: no report"
    return 1
  fi
  python bench/report.py "$out/bench.json" > "$out/report.md"
}

step build build
step gpu gpu_facts
step pytest tests
step bench benchmarks
step report report
step sanitizer sanitizer

echo "=== summary ($summary)"
cat "$summary"
exit "$failed"
