"""The HTTP routes (FastAPI, OpenAI-compatible) and the ingress deployment that serves them.

Routes only translate between HTTP and `serve.app.serving.RoutedChat`; every error leaves as an OpenAI error body:
invalid input as 400 (404 for an unknown model, 413 for a body over the limit), a missing or wrong API key as
401, a spent key as 429, backend trouble and overload as 503, anything unexpected as a 500 without a traceback
(which goes to the replica's log with the request id).
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.app.access import KeyRing, read_api_keys
from serve.app.app_config import RouterAppConfig
from serve.app.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    RouteRequest,
    RouteResponse,
    invalid_request,
    text_completion,
)
from serve.app.serving import (
    Caller,
    ChatResult,
    RoutedChat,
    check_limits,
    text_completion_events,
)
from serve.backends.build import BackendSpec
from serve.backends.pool import PoolBackend

logger = logging.getLogger("ray.serve")
REQUEST_ID = "x-request-id"
OPEN_PATHS = frozenset({"/health", "/health/ready"})
SERVED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/route", "/v1/models", "/v1/backends", "/health", "/health/ready")


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


class Gate:
    """The checks before any route reads the body: the API key (every path but the health routes) and the body's size
    (by its Content-Length, and while it is read). It also notes the request id for the logs: Serve's proxy takes
    it from the client's `x-request-id` or makes one, and echoes it in the response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = scope["app"].state
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        request_id = headers.get(REQUEST_ID) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        refusal = self._refusal(scope["path"], headers, settings, state)
        if refusal is not None:
            return await _error(refusal)(scope, receive, send)
        await self.app(scope, _capped(receive, settings.max_body_bytes), send)

    @staticmethod
    def _refusal(path: str, headers: dict[str, str], settings, state: dict) -> APIError | None:
        keyring: KeyRing = settings.keyring
        if keyring and path not in OPEN_PATHS:
            state["api_key"] = keyring.match(headers.get("authorization"))
            if state["api_key"] is None:
                problem = "no API key given" if "authorization" not in headers else "the API key is not valid"
                return APIError(401, f"{problem}: send `Authorization: Bearer <key>` with a key of this router",
                                code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            return _too_large(settings.max_body_bytes)
        return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")


def _capped(receive: Receive, limit: int) -> Receive:
    """`receive` that refuses a body growing past `limit` (one sent without a Content-Length)."""
    received = 0

    async def receive_capped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _too_large(limit).message)
        return message

    return receive_capped


app = FastAPI(title="FineRouter", description="An OpenAI-compatible LLM router.")
app.add_middleware(Gate)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return _error(error)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    return _error(invalid_request(error.errors()))


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors: a path no route serves (404), a method a route does not take (405), a body over the limit."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code)
    message = str(error.detail)
    if error.status_code == 404:
        message = f"no route {request.url.path!r}: this router serves {', '.join(SERVED_PATHS)}"
    return _error(APIError(error.status_code, message, code=code))


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("request %s: unexpected error on %s", _request_id(request), request.url.path)
    return _error(APIError(500, f"internal error ({type(error).__name__}); the server log has it under the request id",
                           type="server_error"))


def _response(result: ChatResult):
    """A chat result as the HTTP response. (Defined above the ingress class: `serve.ingress` pickles the routes with the
    module's names as they are when the class is defined.)"""
    if result.stream is not None:
        return StreamingResponse(result.stream, media_type="text/event-stream", headers=result.headers)
    return JSONResponse(result.body, headers=result.headers)


def _caller(request: Request) -> Caller:
    return Caller(request_id=_request_id(request) or uuid.uuid4().hex, key=getattr(request.state, "api_key", None))


@serve.deployment(name="RouterIngress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=256)
@serve.ingress(app)
class RouterIngress:
    def __init__(self, embedder: DeploymentHandle, deployments: dict[str, DeploymentHandle], specs: dict[str, BackendSpec],
                 config: RouterAppConfig, ledger: DeploymentHandle | None = None):
        backends = {model: PoolBackend(spec, deployments[spec.backend_id]) for model, spec in specs.items()}
        app.state.keyring = KeyRing(read_api_keys(config.access))
        app.state.max_body_bytes = config.limits.max_body_bytes
        self.config = config
        self.chat = RoutedChat(embedder, backends, config, ledger)

    def reconfigure(self, user_config: dict) -> None:
        """The artifact to decide with, `user_config` `{"artifact": PATH}`: a new one set in serve.config and deployed
        (`serve deploy`) is swapped in, pool and all, no restart. Each model needs a backend, configured when the app
        was built (a `backends` entry may name a model ahead of the artifact that brings it)."""
        self.chat.use(user_config["artifact"])

    @app.get("/health")
    async def health(self) -> dict:
        """Liveness: the ingress answers (the backends may still be starting; see /health/ready)."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(self) -> dict:
        """Readiness: 200 once every backend answers its health check, else 503 naming those that do not."""
        states = await self.chat.readiness()
        waiting = sorted(backend_id for backend_id, ready in states.items() if not ready)
        if waiting:
            raise APIError(503, f"not ready: the backends {waiting} do not answer yet (starting, or failing their "
                                "health check)", type="service_unavailable", code="not_ready",
                           retry_after_s=self.config.limits.retry_after_s)
        return {"status": "ready", "engines": sorted(states)}

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return self.chat.models()

    @app.get("/v1/backends")
    async def backends(self) -> dict:
        """Each pool model's backend and its cool-down state, as this ingress replica sees it."""
        return {"object": "list", "data": self.chat.backend_states()}

    @app.post("/v1/route")
    async def route(self, body: RouteRequest, request: Request) -> RouteResponse:
        check_limits(body, body.messages, self.config)
        if body.policy == "cascade":
            raise APIError(400, "policy: /v1/route returns the routing decision alone, and a cascade decides on the models' "
                                "answers; send the request to /v1/chat/completions", param="policy")
        decision = await self.chat.route(body.text(), body, body.needs(), _caller(request))
        return RouteResponse(model=decision.eligible_models()[0], **decision.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return _response(await self.chat.chat(body, _caller(request)))

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        """The legacy completions API, answered as a chat of one user message (as LiteLLM's text_completion does
        for chat models), in the text completion shape."""
        result = await self.chat.chat(body.as_chat(), _caller(request))
        if result.stream is not None:
            result.stream = text_completion_events(result.stream)
        else:
            result.body = text_completion(result.body)
        return _response(result)

    @app.post("/v1/embeddings")
    async def embeddings(self) -> None:
        raise APIError(404, "this router serves chat completions (/v1/chat/completions) and the legacy completions; it "
                            "serves no embeddings", code="not_found")
