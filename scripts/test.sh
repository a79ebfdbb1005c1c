#!/usr/bin/env bash
# The test command: every test, slow integration tests included, in a shuffled order (pytest-randomly: the seed is
# printed at the top; `--randomly-seed=N` replays an order, `-p no:randomly` keeps file order), with the 20 slowest
# tests listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q --durations=20 "$@"
