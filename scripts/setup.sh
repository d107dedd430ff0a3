#!/usr/bin/env bash
# Installs what spikeops needs and builds it in place. Safe to run again: torch is installed only
# when missing (on a CPU machine `torch==2.13.0` is the CPU wheel; a GPU machine keeps its CUDA
# torch), and the extension is rebuilt only when its sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q numpy safetensors "transformers>=5.17,<6" gguf accelerate matplotlib ninja \
  pytest pytest-benchmark "setuptools>=64" wheel
# The optional eval extra (spikeops lm-eval; tests/test_lm_eval.py runs with it, skips without).
"$PY" -m pip install -q "lm_eval>=0.4.13"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
