#!/usr/bin/env bash
# The test command: every test, slow integration tests included, in file order, with the 20 slowest tests listed at
# the end. SHUFFLE=1 runs them in a shuffled order instead (pytest-randomly), naming each test as it runs and
# printing the seed first; `SHUFFLE=1 scripts/test.sh --randomly-seed=N` replays an order.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
order=(-q -p no:randomly)
[ "${SHUFFLE:-0}" = 1 ] && order=(-v -p randomly)
.venv/bin/python -m pytest "${order[@]}" -rfE --durations=20 "$@"
