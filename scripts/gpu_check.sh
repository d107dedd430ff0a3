#!/usr/bin/env bash
# The whole check on a GPU machine (torch with CUDA, nvcc, no network), in stages so that it fits
# device calls of at most 10 minutes: clean CUDA build for the GPU present, GPU facts, how the
# extension links the C++ runtime and its error path on both devices, the test suite, the
# benchmarks (one JSON per stage) and their report, compute-sanitizer memcheck on the small CUDA
# tests.
# Every stage runs even after a failed one, each under its own time limit (seconds; the
# defaults below, or STAGE_TIMEOUT for all); its exit code goes to OUTDIR/summary.txt (124: time
# limit) and the script exits non-zero if any failed. Stages other than `build` build only when
# the CUDA kernels are not importable yet (a fresh machine). PYTHON picks the interpreter
# (default python3, the one that holds torch on the GPU machines). NO_BUILD=1 never builds: the
# dry run of the stages' shell logic on a machine without a GPU (CUDA cases then skip).
#
# Usage: scripts/gpu_check.sh OUTDIR [STAGE ...]
# Stages (all but the full bench-linear-* / bench-ops / bench-model when none is named):
#   build prefill pdl tests bench-core bench-encode bench-decode bench-pdl report sanitizer
#   (their limits add up to 17 minutes, more than a 15-minute device session: name the
#   correctness stages in a first call, `build prefill pdl tests`, the benchmarks in a second)
#   bench-prefill bench-linear-7B bench-linear-8B bench-linear-70B bench-ops bench-model
# prefill: the exactness tests of the tensor-core prefill kernel (csrc/cuda/linear_mma.cu), first
# after the build: its host emulation (tests/test_cuda_mma_layout.py) and its CUDA-against-CPU
# cases (tests/test_cuda.py -k prefill); bench-core then times it at M = 2048 (auto entries).
# pdl: the decode kernel's programmatic dependent launch (sm_90 and later, csrc/cuda/linear_decode.cu),
# CUDA against CPU with it and without (SPIKEOPS_PDL=0): encode then linear for M = 1..16, a
# ProjectionGroup's launches in a row, a non-encoder kernel writing the inputs right before, and
# graph capture; pdl.txt starts with the device's compute capability (below 9.0 both runs are
# the same launch). bench-pdl: the A/B timing of the same (bench/test_linear.py::test_pdl).
# bench-prefill: spike_linear at M = 64, 256 and 2048 on the 7B shapes, W4, auto and baselines.
# bench-core: spike_linear at M = 1 and 2048 on the LLaMA-2-7B shapes (W4); bench-encode:
# gif_encode on 4096-wide inputs; bench-decode: whole-model decode at batch 1 and 16 (the -k
# pattern matches both; transformers' forward captured whole, spikeops.Runner eager and with its
# own CUDA graphs).
# OUTDIR receives summary.txt, build.txt, gpu.txt, runtime.txt, prefill.txt, pdl.txt, pytest.txt,
# sanitizer.txt, bench-*.txt, bench-*.json and report.md (from every bench-*.json present in
# OUTDIR).
set -uo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUTDIR [STAGE ...]" >&2
  exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
shift
stages=("$@")
if (( ${#stages[@]} == 0 )); then
  stages=(build prefill pdl tests sanitizer bench-core bench-encode bench-decode bench-pdl report)
fi
PY=${PYTHON:-python3}
# Each stage's time limit in seconds.
declare -A LIMIT=([build]=200 [prefill]=90 [pdl]=90 [tests]=150 [sanitizer]=90 [bench-core]=150
                  [bench-encode]=45 [bench-decode]=120 [bench-pdl]=60 [report]=30
                  [bench-prefill]=150)
cd "$(dirname "$0")/.."
summary="$out/summary.txt"
touch "$summary"
failed=0

# step NAME COMMAND...: runs the command, records and prints its exit code.
step() {
  local name="$1"
  shift
  echo "=== [$(date +%H:%M:%S)] $name"
  export STAGE_LIMIT="${STAGE_TIMEOUT:-${LIMIT[$name]:-600}}"
  "$@"
  local rc=$?
  echo "$name $rc" >> "$summary"
  echo "=== [$(date +%H:%M:%S)] $name: exit $rc"
  if (( rc != 0 )); then failed=1; fi
  return 0
}

# limited COMMAND...: COMMAND under the current stage's time limit (exit 124 when it runs out).
limited() {
  timeout --kill-after=10 "$STAGE_LIMIT" "$@"
}

cuda_ready() {
  "$PY" -c 'import torch, spikeops; raise SystemExit(0 if torch.cuda.is_available() and
torch._C._dispatch_has_kernel_for_dispatch_key("spikeops::spike_linear", "CUDA") else 1)' \
    2>/dev/null
}

build() {
  local rc=0
  if [[ "${NO_BUILD:-0}" == 1 ]]; then
    echo "NO_BUILD=1: not built; the facts below are of the extension present" |
      tee "$out/build.txt"
  else
    rm -rf build python/spikeops/_C*.so
    # No TORCH_CUDA_ARCH_LIST: setup.py then builds for the GPU present only. setup.py also
    # fails when the extension holds its own C++ runtime (scripts/check_runtime.py).
    SPIKEOPS_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" limited "$PY" -m pip install \
      --no-build-isolation --no-deps -v -e . 2>&1 | tee "$out/build.txt"
    rc=${PIPESTATUS[0]}
  fi
  gpu_facts
  runtime_facts
  local facts=$?
  (( rc != 0 )) || rc=$facts  # the build's own failure first
  return "$rc"
}

ensure_built() {
  [[ "${NO_BUILD:-0}" == 1 ]] || cuda_ready || build
}

gpu_facts() {
  {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
      --format=csv
    "$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
import spikeops  # noqa: F401  (registers the ops)
registered = torch._C._dispatch_has_kernel_for_dispatch_key("spikeops::spike_linear", "CUDA")
print("spikeops CUDA kernels registered:", registered)
PY
  } 2>&1 | tee "$out/gpu.txt"
}

# How the extension links the C++ runtime, and the error path on each device (OUTDIR/runtime.txt).
# On the GPU image of 2026-11-28 every error message holding a number crashed inside the
# extension (std::ostream::_M_insert<long> resolved into _C.so itself; docs/performance.md, "GPU
# status"), on both devices. Fails when the extension defines C++ stream or locale code or a
# probe fails.
runtime_facts() {
  {
    local so bad=0
    "${CXX:-c++}" --version | head -n 1
    "$PY" -c 'import torch; print("torch:", torch.__config__.show().split("\n")[1].strip(" -"))'
    env | grep -E "^(CC|CXX|CFLAGS|CXXFLAGS|CPPFLAGS|LDFLAGS|LDSHARED)=" ||
      echo "no compiler variables set"
    "$PY" -c 'import sysconfig; print("LDSHARED:", sysconfig.get_config_var("LDSHARED"))'
    grep -E "spikeops setup:|-shared " "$out/build.txt"  # removed flags, the link command
    so="$(ls python/spikeops/_C*.so 2>/dev/null | head -n 1)"
    if [[ -z "$so" ]]; then
      echo "no python/spikeops/_C*.so"
      bad=1
    else
      ldd "$so" | grep -E "stdc|gcc_s|gomp|c10|torch_cpu"
      readelf -p .comment "$so"  # the compilers that built its objects
      "$PY" scripts/check_runtime.py "$so" || bad=1
      echo "bindings of _M_insert<long> and std::locale::id from or to _C.so (libstdc++.so.6 is"
      echo "right, _C.so itself is the fault):"
      LD_DEBUG=bindings "$PY" scripts/err_probe.py 2>&1 |
        grep -E '_ZNSo9_M_insertIlEERSoT_|_ZNSt6locale2id' | grep -F "/_C." | head
    fi
    # One process per device, so that a crash on one leaves the other's result (exit 139: SIGSEGV).
    for d in cpu cuda; do
      "$PY" scripts/err_probe.py "$d"
      local probe=$?
      echo "error path on $d: exit $probe"
      (( probe == 0 )) || bad=1
    done
    (( bad == 0 ))
  } 2>&1 | tee "$out/runtime.txt"
  return "${PIPESTATUS[0]}"
}

tests() {
  ensure_built
  local parallel=()
  if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
  limited "$PY" -m pytest tests -q -rs -p no:cacheprovider "${parallel[@]}" 2>&1 |
    tee "$out/pytest.txt"
  return "${PIPESTATUS[0]}"
}

prefill() {
  ensure_built
  limited "$PY" -m pytest tests/test_cuda_mma_layout.py tests/test_cuda.py -q -rs \
    -p no:cacheprovider -k "mma or prefill" 2>&1 | tee "$out/prefill.txt"
  return "${PIPESTATUS[0]}"
}

pdl() {
  ensure_built
  {
    "$PY" -c 'import torch; print("compute capability", torch.cuda.get_device_capability(0))' \
      2>&1
    limited "$PY" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider \
      -k "back_to_back or in_a_row or writes_its_inputs or graph" 2>&1
  } | tee "$out/pdl.txt"
  return "${PIPESTATUS[0]}"
}

sanitizer() {
  ensure_built
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
  # Small cases only (memcheck slows kernels 10-100x), time-bounded.
  # Graph capture cannot run without the caching allocator (cudaMalloc is illegal while
  # capturing), so the capture and torch.compile tests run in the tests stage only; the 160
  # encode-then-linear cases run in the pdl and tests stages (the other PDL cases run here).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 limited "$tool" --tool memcheck --error-exitcode 97 \
    "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
    -k "not 4096 and not 4128 and not graph and not compile and not back_to_back" 2>&1 |
    tee "$out/sanitizer.txt"
  return "${PIPESTATUS[0]}"
}

# bench NAME PYTEST-ARGS...: one benchmark stage, its JSON in OUTDIR/bench-NAME.json.
bench() {
  local name="$1"
  shift
  ensure_built
  limited "$PY" -m pytest "$@" -q -p no:cacheprovider --benchmark-json "$out/bench-$name.json" \
    2>&1 | tee "$out/bench-$name.txt"
  local rc=${PIPESTATUS[0]}
  if (( rc == 5 )); then  # pytest: no tests collected, a failure here
    echo "no benchmarks collected for $name" | tee -a "$out/bench-$name.txt"
  fi
  return "$rc"
}

report() {
  local files=("$out"/bench-*.json)
  if [[ ! -e "${files[0]}" ]]; then
    echo "no bench-*.json in $out: no report"
    return 1
  fi
  limited "$PY" bench/report.py "${files[@]}" > "$out/report.md"
}

for s in "${stages[@]}"; do
  case "$s" in
    build) step build build ;;
    prefill) step prefill prefill ;;
    pdl) step pdl pdl ;;
    tests) step tests tests ;;
    sanitizer) step sanitizer sanitizer ;;
    bench-core) step "$s" bench core bench/test_linear.py \
      -k "7B-qkvo-M1-W4 or 7B-qkvo-M2048-W4 or 7B-gate_up-M1-W4 or 7B-gate_up-M2048-W4" ;;
    bench-encode) step "$s" bench encode bench/test_ops.py -k "gif_encode and 4096" ;;
    bench-decode) step "$s" bench decode bench/test_model.py -k "decode-batch1" ;;
    bench-pdl) step "$s" bench pdl bench/test_linear.py -k "test_pdl" ;;
    bench-prefill) step "$s" bench prefill bench/test_linear.py \
      -k "7B- and (M64- or M256- or M2048-) and W4- and not spike- and not timestep" ;;
    bench-linear-7B) step "$s" bench linear-7B bench/test_linear.py -k "7B-" ;;
    bench-linear-8B) step "$s" bench linear-8B bench/test_linear.py -k "8B-" ;;
    bench-linear-70B) step "$s" bench linear-70B bench/test_linear.py -k "70B-" ;;
    bench-ops) step "$s" bench ops bench/test_ops.py bench/test_tracking.py ;;
    bench-model) step "$s" bench model bench/test_model.py ;;
    report) step report report ;;
    *) echo "unknown stage: $s" >&2; echo "$s 2" >> "$summary"; failed=1 ;;
  esac
done

echo "=== summary ($summary)"
cat "$summary"
exit "$failed"
