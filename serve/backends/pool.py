"""`PoolBackend`: the ingress's view of one pool model, whatever backend answers it.

It yields plain OpenAI dicts (a completion, or chunks) and raises `BackendFailure` when another model should
answer, `APIError` when the request itself was refused (by the engine's own validation or by the upstream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.backends.build import BackendSpec
from serve.backends.failures import BackendFailure, classify, describe
from serve.errors import APIError, invalid_request

READY_TIMEOUT_S = 2.0  # a health check unanswered for this long: the backend is not ready


class PoolBackend:
    def __init__(self, spec: BackendSpec, handle: DeploymentHandle):
        self.spec, self.handle = spec, handle.options(stream=True)

    def _call(self, body: dict, stream: bool, request_id: str):
        request = {**body, "model": self.spec.served_model, "stream": stream}
        if self.spec.transport == "openai-http":
            return self.handle.chat.remote(request, request_id)
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        return self.handle.chat.remote(ChatCompletionRequest(**request))

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Whether the backend answers its health check now (a replica still starting does not)."""
        async def checked():
            await self.handle.options(stream=False).check_health.remote()

        try:
            await asyncio.wait_for(checked(), timeout_s)
        except Exception:  # no replica yet (timeout), or one failing its health check
            return False
        return True

    async def start(self, body: dict, stream: bool, request_id: str) -> tuple[dict, AsyncIterator[dict]]:
        """The first output (the whole completion when not streamed) and an iterator over the rest.

        Raises BackendFailure when nothing came within the backend's timeout or the backend broke before
        its first output, so the caller can still hand the request to the next model.
        """
        outputs = self._outputs(body, stream, request_id)
        try:
            first = await asyncio.wait_for(anext(outputs), self.spec.timeout_s)
        except StopAsyncIteration:
            raise BackendFailure("returned nothing") from None
        except asyncio.TimeoutError:
            await outputs.aclose()
            raise BackendFailure(f"no answer within {self.spec.timeout_s:g} s") from None
        return first, outputs

    async def _outputs(self, body: dict, stream: bool, request_id: str) -> AsyncIterator[dict]:
        responses = None
        try:
            responses = self._call(body, stream, request_id)
            async for item in responses:
                for payload in payloads(item):
                    if "error" in payload:
                        raise classify(payload["error"])
                    yield payload
        except (BackendFailure, APIError):
            raise
        except ValidationError as error:  # the engine's own request model refused a parameter
            raise invalid_request(error) from None
        except BackPressureError as error:
            raise BackendFailure("overloaded", detail=describe(error)) from error
        except RayActorError as error:
            raise BackendFailure("replica failed", detail=describe(error)) from error
        except Exception as error:  # an engine crash, an unreadable answer
            raise BackendFailure("failed", detail=describe(error)) from error
        finally:
            if responses is not None:
                responses.cancel()


def payloads(item: Any) -> list[dict]:
    """The JSON payloads in one item that a backend yielded: a pydantic response, a dict, or SSE strings."""
    if hasattr(item, "model_dump"):
        return [item.model_dump()]
    if isinstance(item, dict):
        return [item]
    if isinstance(item, str):
        return [json.loads(line[5:]) for line in item.splitlines()
                if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    return [payload for element in item for payload in payloads(element)]
