#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py). Here, once: `bash benchmarks/gpu_check.sh --prepare` writes what it
# needs into .gpu_check (git-ignored). Then on the lent GPU machine, carrying .gpu_check:
#   bash benchmarks/gpu_check.sh [--steps encode knn decide] [--rows 1000000]
# It stops at the first failed step with a non-zero exit, and within GPU_CHECK_TIMEOUT_S (default 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  shift
  exec .venv/bin/python benchmarks/gpu_check.py prepare "$@"
fi
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "${PYTHON:-python3}" -u benchmarks/gpu_check.py run "$@"
