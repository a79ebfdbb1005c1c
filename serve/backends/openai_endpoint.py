"""`OpenAIEndpoint`: one OpenAI-compatible HTTP endpoint (a vLLM server, a hosted API) as a pool backend.

`build_app` deploys one per `openai` pool model. Its `chat` yields the same shapes as Ray Serve LLM's
`LLMServer.chat` (one completion, or lists of SSE strings, or an OpenAI error body carrying the HTTP status in
`code`), so the ingress handles both kinds alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from serve.backends.failures import DROPPED, TIMED_OUT, UNREACHABLE, UNREADABLE
from serve.backends.retry import TRANSIENT_ERRORS, RetryPolicy, is_request_fault
from serve.errors import error_body

logger = logging.getLogger("ray.serve")
LOGGED_BODY_CHARS = 500


class OpenAIEndpoint:
    """Retries what `serve.backends.retry` calls transient, but only before any output has been passed on; what
    still fails is yielded as an error body whose message names the failure without the upstream's text or URL
    (those go to this replica's log with the request id)."""

    def __init__(self, base_url: str, api_key_env: str | None, timeout_s: float, retry: RetryPolicy):
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RuntimeError(f"environment variable {api_key_env} (the API key for {base_url}) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.retry = retry

    async def chat(self, request: dict, request_id: str | None = None) -> AsyncIterator[Any]:
        headers = {"x-request-id": request_id} if request_id else None
        started = False  # once output has been passed on, a failure cannot be retried
        for attempt in range(self.retry.attempts):
            await asyncio.sleep(self.retry.delay_s(attempt))
            try:
                async with self.client.stream("POST", "chat/completions", json=request, headers=headers) as response:
                    if response.status_code >= 400:
                        text = (await response.aread()).decode(errors="replace")
                        if self.retry.retry_status(response.status_code, attempt):
                            self._log(request_id, f"HTTP {response.status_code}, retrying", text)
                            continue
                        self._log(request_id, f"HTTP {response.status_code}", text)
                        yield _status_body(response.status_code, text)
                        return
                    if request.get("stream"):
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                started = True
                                yield [line + "\n\n"]
                    else:
                        yield json.loads(await response.aread())
                    return
            except TRANSIENT_ERRORS as error:
                if not started and self.retry.retry_error(attempt):
                    self._log(request_id, f"{type(error).__name__}, retrying", str(error))
                    continue
                self._log(request_id, type(error).__name__, str(error))
                yield _transport_body(error)
                return
            except json.JSONDecodeError as error:
                self._log(request_id, "not JSON", str(error))
                yield error_body("", UNREADABLE, code=502)
                return

    async def check_health(self) -> None:
        """Serve's health check of the replica, and the router's readiness probe: the replica is up. Whether the
        upstream answers is the cool-down's business, request by request."""

    def _log(self, request_id: str | None, what: str, detail: str) -> None:
        logger.warning("request %s: %s%s: %s", request_id or "-", self.client.base_url, what, detail[:LOGGED_BODY_CHARS])

    async def close(self) -> None:
        """Close the connection pool; called by the replica's shutdown (`__del__`)."""
        await self.client.aclose()

    async def __del__(self):
        await self.close()


def _status_body(status: int, text: str) -> dict:
    """An upstream's HTTP error as an error body: its own message only where the request was at fault."""
    body = error_body("", "upstream_error", code=status)
    if is_request_fault(status):
        try:
            upstream = json.loads(text)["error"]
            body["error"] |= {key: upstream[key] for key in ("message", "type", "param") if upstream.get(key) is not None}
        except (ValueError, KeyError, TypeError, AttributeError):  # not an OpenAI error body
            body["error"]["message"] = text
    return body


def _transport_body(error: httpx.TransportError) -> dict:
    if isinstance(error, httpx.TimeoutException):
        kind, status = TIMED_OUT, 504
    elif isinstance(error, httpx.ConnectError):
        kind, status = UNREACHABLE, 503
    else:
        kind, status = DROPPED, 502
    return error_body("", kind, code=status)
