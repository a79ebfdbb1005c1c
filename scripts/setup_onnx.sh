#!/usr/bin/env bash
# Add the encoder's ONNX Runtime backends to the environment scripts/setup.sh built: install the `onnx` extra
# (onnxruntime, and onnx for the export) and export the default encoder once, offline, into
# .cache/models/all-MiniLM-L6-v2-onnx, so `--embedder all-MiniLM-L6-v2@onnx-int8` (or `@onnx`) trains, serves and
# batch-routes (docs/encoder.md). Idempotent. Prints each step's seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
began=$SECONDS
.venv/bin/python -m pip --no-input --quiet install -e ".[onnx]"
echo "setup: onnx extra $((SECONDS - began)) s"
began=$SECONDS
HF_HUB_OFFLINE=1 .venv/bin/python -m serve.core.onnx_encoder "$@"
echo "setup: ONNX export $((SECONDS - began)) s"
