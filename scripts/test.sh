#!/usr/bin/env bash
# The test job on a fresh machine: set up, run the test suite, then every benchmark once as a
# smoke test. Fails if pytest collects no test (exit code 5) or any step fails. CUDA cases skip,
# with their reason, on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
run_pytest() {
  local rc=0
  "$PY" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests in: $*" >&2
    exit 1
  fi
  return "$rc"
}
run_pytest tests -q -rs -p no:cacheprovider
run_pytest bench -q -p no:cacheprovider --benchmark-disable
