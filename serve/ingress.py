"""The HTTP routes (FastAPI, OpenAI-compatible) and the ingress deployment that serves them.

Routes only translate between HTTP and `serve.serving.RoutedChat`; every error leaves as an OpenAI error body:
invalid input as 400 (404 for an unknown model), backend trouble as 503, anything unexpected as a 500
without a traceback (which goes to the replica's log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve.backends import BackendSpec, PoolBackend
from serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ModelList,
    RouteRequest,
    RouteResponse,
)
from serve.serving import RoutedChat

logger = logging.getLogger("ray.serve")
app = FastAPI(title="FineRouter", description="An OpenAI-compatible LLM router.")


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return _error(error)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    problem = error.errors()[0]
    location = [str(part) for part in problem["loc"] if part != "body"]
    message = problem["msg"].removeprefix("Value error, ")
    return _error(APIError(400, f"{'.'.join(location) + ': ' if location else ''}{message}", param=location[0] if location else None))


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return _error(APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return _error(APIError(500, f"internal error ({type(error).__name__}); see the server log", type="server_error"))


@serve.deployment(name="RouterIngress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class RouterIngress:
    def __init__(self, embedder: DeploymentHandle, router: DeploymentHandle, engines: dict[str, DeploymentHandle],
                 specs: dict[str, BackendSpec], default_preset: str, max_attempts: int):
        backends = {model: PoolBackend(spec, engines[spec.engine]) for model, spec in specs.items()}
        self.chat = RoutedChat(embedder, router, backends, default_preset, max_attempts)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return self.chat.models()

    @app.post("/v1/route")
    async def route(self, request: RouteRequest) -> RouteResponse:
        decision = await self.chat.route(request.text(), request)
        return RouteResponse(model=decision.ranking[0].model, **decision.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: ChatCompletionRequest):
        result = await self.chat.chat(request)
        if result.stream is not None:
            return StreamingResponse(result.stream, media_type="text/event-stream", headers=result.headers)
        return JSONResponse(result.body, headers=result.headers)
