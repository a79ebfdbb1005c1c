"""The backend pool: how each pool model is deployed, and how the ingress talks to any of them alike.

Two deployment types answer chat requests:
- Ray Serve LLM's `LLMServer` (kinds `vllm` and `local`), whose `chat` takes its own ChatCompletionRequest;
- `OpenAIEndpoint` (kind `openai`), a thin HTTP client to an OpenAI-compatible server, whose `chat` takes the
  request as a dict and yields the same shapes as `LLMServer.chat`: one response, or lists of SSE strings.
`PoolBackend` hides the difference: it yields plain OpenAI dicts (a completion, or chunks) and raises
`BackendFailure` when another model should answer, `APIError` when the request itself was refused.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import (
    STAND_IN_NAME,
    LocalEngineConfig,
    OpenAIBackend,
    RouterAppConfig,
    VLLMBackend,
)
from serve.local_model import MODEL_NAME, prepare_local_model
from serve.protocol import APIError
from serve.settings import cache_dir

LOCAL_ENGINE = "local"  # the engine key of the shared stand-in
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class BackendFailure(Exception):
    """The backend could not answer (down, timed out, 5xx): the next model of the ranking should."""


class OpenAIEndpoint:
    """One OpenAI-compatible HTTP endpoint as a pool backend (deployed by `build_app`, one per pool model).

    Retries connection errors, 408/429 and 5xx with exponential backoff, but only before any output has been
    passed on. What still fails is yielded as an OpenAI error body carrying the HTTP status in `code` (503 for
    an unreachable endpoint), as `LLMServer` yields its errors, so the ingress handles both alike.
    """

    def __init__(self, base_url: str, api_key_env: str | None, timeout_s: float, max_retries: int):
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RuntimeError(f"environment variable {api_key_env} (the API key for {base_url}) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s)
        self.max_retries = max_retries

    async def chat(self, request: dict) -> AsyncIterator[Any]:
        started = False  # once output has been passed on, a failure cannot be retried
        for attempt in range(self.max_retries + 1):
            last_attempt = attempt == self.max_retries
            try:
                async with self.client.stream("POST", "chat/completions", json=request) as response:
                    if response.status_code in _RETRYABLE_STATUS and not last_attempt:
                        await asyncio.sleep(0.1 * 2**attempt)
                        continue
                    if response.status_code >= 400:
                        yield _error_body(response.status_code, (await response.aread()).decode(errors="replace"))
                        return
                    if request.get("stream"):
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                started = True
                                yield [line + "\n\n"]
                    else:
                        yield json.loads(await response.aread())
                    return
            except httpx.TransportError as error:
                if started or last_attempt:
                    yield _error_body(503, f"{self.client.base_url} unreachable: {type(error).__name__}: {error}")
                    return
                await asyncio.sleep(0.1 * 2**attempt)


def _error_body(status: int, text: str) -> dict:
    """An upstream error as an OpenAI error body, keeping the upstream's own body where it is one."""
    try:
        error = json.loads(text)["error"]
        if isinstance(error, dict):
            return {"error": {**error, "code": status}}
    except (ValueError, KeyError, TypeError):
        pass
    return {"error": {"message": text[:500] or f"HTTP {status}", "type": "upstream_error", "param": None, "code": status}}


def local_llm_config(engine: LocalEngineConfig):
    """The Ray Serve LLM config of the shared stand-in engine on vLLM-CPU."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": MODEL_NAME, "model_source": engine.model_source or str(prepare_local_model())},
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1}]},  # the vLLM worker, pinned to one core
        engine_kwargs={"enforce_eager": True, "max_model_len": engine.max_model_len, "dtype": "bfloat16", **engine.engine_kwargs},
        deployment_config=engine.deployment_config,
        runtime_env={"env_vars": {
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
            "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),
        }},
        log_engine_metrics=False,
    )


def vllm_llm_config(model: str, backend: VLLMBackend):
    """The Ray Serve LLM config of a pool model on its own vLLM engine, served under the pool name."""
    from ray.serve.llm import LLMConfig

    options = {"placement_group_config": backend.placement_group_config} if backend.placement_group_config else {}
    return LLMConfig(
        model_loading_config={"model_id": model, "model_source": backend.model_source},
        accelerator_type=backend.accelerator_type,
        engine_kwargs=backend.engine_kwargs,
        deployment_config=backend.deployment_config,
        runtime_env=backend.runtime_env,
        **options,
    )


@dataclass(frozen=True)
class BackendSpec:
    """How the ingress reaches one pool model: which engine deployment, under which name."""

    engine: str  # key of the deployment handle
    served_model: str  # the name the engine knows the model by
    protocol: Literal["ray-serve-llm", "openai-http"]
    timeout_s: float
    stand_in: str | None = None


def build_backends(config: RouterAppConfig, models: list[str]) -> tuple[dict[str, Any], dict[str, BackendSpec]]:
    """(engine key -> bound deployment, pool model -> spec). `local` models share one engine."""
    from ray.serve.llm import build_llm_deployment

    engines: dict[str, Any] = {}
    specs: dict[str, BackendSpec] = {}
    for model in models:
        backend = config.backend_for(model)
        if backend.kind == "local":
            if LOCAL_ENGINE not in engines:
                engines[LOCAL_ENGINE] = build_llm_deployment(local_llm_config(config.local), name_prefix="StandIn:")
            specs[model] = BackendSpec(LOCAL_ENGINE, MODEL_NAME, "ray-serve-llm", config.local.timeout_s, stand_in=STAND_IN_NAME)
        elif backend.kind == "vllm":
            engines[model] = build_llm_deployment(vllm_llm_config(model, backend), name_prefix="VLLM:")
            specs[model] = BackendSpec(model, model, "ray-serve-llm", backend.timeout_s)
        else:
            engines[model] = _openai_deployment(model, backend)
            specs[model] = BackendSpec(model, backend.model or model, "openai-http", backend.timeout_s)
    return engines, specs


def _openai_deployment(model: str, backend: OpenAIBackend):
    deployment = serve.deployment(OpenAIEndpoint).options(name=f"OpenAI:{model}", **backend.deployment_config)
    return deployment.bind(backend.base_url, backend.api_key_env, backend.timeout_s, backend.max_retries)


class PoolBackend:
    """The ingress's view of one pool model: OpenAI dicts out, failures classified for fallback."""

    def __init__(self, spec: BackendSpec, handle: DeploymentHandle):
        self.spec, self.handle = spec, handle.options(stream=True)

    def _request(self, body: dict, stream: bool):
        request = {**body, "model": self.spec.served_model, "stream": stream}
        if self.spec.protocol == "openai-http":
            return request
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        return ChatCompletionRequest(**request)

    async def start(self, body: dict, stream: bool) -> tuple[dict, AsyncIterator[dict]]:
        """The first output (the whole completion when not streamed) and an iterator over the rest.

        Raises BackendFailure when nothing came within the backend's timeout or the backend broke before
        its first output, so the caller can still hand the request to the next model.
        """
        outputs = self._outputs(body, stream)
        try:
            first = await asyncio.wait_for(anext(outputs), self.spec.timeout_s)
        except StopAsyncIteration:
            raise BackendFailure("the backend returned nothing") from None
        except asyncio.TimeoutError:
            await outputs.aclose()
            raise BackendFailure(f"no output within {self.spec.timeout_s:g} s") from None
        return first, outputs

    async def _outputs(self, body: dict, stream: bool) -> AsyncIterator[dict]:
        responses = self.handle.chat.remote(self._request(body, stream))
        try:
            async for item in responses:
                for payload in _payloads(item):
                    if "error" in payload:
                        raise _classify(payload["error"])
                    yield payload
        except (BackendFailure, APIError):
            raise
        except Exception as error:  # a dead replica, an engine crash, a transport error upstream
            raise BackendFailure(_short(error)) from error
        finally:
            responses.cancel()


def _payloads(item: Any) -> list[dict]:
    """The JSON payloads in one item that a backend yielded: a pydantic response, a dict, or SSE strings."""
    if hasattr(item, "model_dump"):
        return [item.model_dump()]
    if isinstance(item, dict):
        return [item]
    if isinstance(item, str):
        return [json.loads(line[5:]) for line in item.splitlines()
                if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    return [payload for element in item for payload in _payloads(element)]


def _classify(error: dict) -> Exception:
    """A refused request (4xx other than timeouts and rate limits) goes back to the client; the rest falls back."""
    status = error.get("code")
    status = int(status) if isinstance(status, int) or (isinstance(status, str) and status.isdigit()) else 500
    message = str(error.get("message") or "the backend failed")
    if 400 <= status < 500 and status not in _RETRYABLE_STATUS:
        return APIError(status, message, type=error.get("type") or "invalid_request_error", param=error.get("param"))
    return BackendFailure(f"HTTP {status}: {message[:200]}")


def _short(error: BaseException) -> str:
    """One line naming the error, for the `fallbacks` field (the full traceback goes to the log)."""
    error = getattr(error, "cause", None) or error  # a RayTaskError wraps what the replica raised
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1][:200] if lines else ''}"
