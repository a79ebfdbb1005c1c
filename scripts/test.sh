#!/usr/bin/env bash
# The test command: every test, slow integration tests included, in a shuffled order (pytest-randomly: the seed is
# printed first and each test is named as it starts, so a failure can be replayed with `--randomly-seed=N`), with
# the 20 slowest tests listed at the end. FILE_ORDER=1 runs them in file order instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
order=(-v -p randomly)
[ "${FILE_ORDER:-0}" = 1 ] && order=(-q -p no:randomly)
.venv/bin/python -m pytest "${order[@]}" -rfE --durations=20 "$@"
