#!/usr/bin/env bash
# The test command: every test, slow integration tests included, in file order, with the 20 slowest tests listed at
# the end. SHUFFLE=1 runs them in a shuffled order instead (pytest-randomly; `--randomly-seed=N` replays an order).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
order=(-p no:randomly)
[ "${SHUFFLE:-0}" = 1 ] && order=(-p randomly -v)
.venv/bin/python -m pytest -q "${order[@]}" --durations=20 "$@"
