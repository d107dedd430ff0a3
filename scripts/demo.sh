#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the demonstration (arguments pass through,
# see `python -m spikeops demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m spikeops demo "$@"
