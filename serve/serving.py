"""The serving logic behind the HTTP routes: decide, then answer with the best model that works.

Kept apart from FastAPI (as vLLM keeps `serving_chat` apart from its `api_server`), so the routes in
`serve.ingress` stay a thin translation between HTTP and these calls.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter

from serve.backends import BackendFailure, PoolBackend
from serve.protocol import (
    ROUTER_MODEL,
    APIError,
    ChatCompletionRequest,
    Fallback,
    ModelCard,
    ModelList,
    RoutingControls,
    RoutingDecision,
    RoutingInfo,
    routing_text,
)

logger = logging.getLogger("ray.serve")


@dataclass
class ChatResult:
    """A chat answer for the HTTP layer: a completion body, or an SSE stream; headers either way."""

    headers: dict[str, str]
    body: dict | None = None
    stream: AsyncIterator[str] | None = None


@dataclass
class _Metrics:
    requests: Counter = field(default_factory=lambda: Counter(
        "finerouter_requests", description="Chat requests answered, by answering model and whether routed.",
        tag_keys=("model", "routed")))
    estimated_cost: Counter = field(default_factory=lambda: Counter(
        "finerouter_estimated_cost_usd", description="The router's cost estimate of the answered requests, in USD.",
        tag_keys=("model",)))
    fallbacks: Counter = field(default_factory=lambda: Counter(
        "finerouter_fallbacks", description="Backend failures that handed a request to the next model, by failed model.",
        tag_keys=("model",)))


class RoutedChat:
    def __init__(self, embedder: DeploymentHandle, router: DeploymentHandle, backends: dict[str, PoolBackend],
                 default_preset: str, max_attempts: int):
        self.embedder, self.router, self.backends = embedder, router, backends
        self.default_preset, self.max_attempts = default_preset, max_attempts
        self.metrics = _Metrics()

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=ROUTER_MODEL)] + [ModelCard(id=model) for model in self.backends])

    async def route(self, text: str, controls: RoutingControls) -> RoutingDecision:
        if controls.candidates is not None:
            unknown = sorted(set(controls.candidates) - set(self.backends))
            if unknown:
                raise APIError(400, f"unknown candidates {unknown}; the pool is {list(self.backends)}", param="candidates")
        # The embedding goes from the Embedder to the Router without a round trip through this replica.
        embedded = self.embedder.embed.remote(text)
        return await self.router.decide.remote(embedded, text, controls.resolved_cost_weight(self.default_preset),
                                               controls.candidates, controls.max_cost)

    async def chat(self, request: ChatCompletionRequest) -> ChatResult:
        if request.model == ROUTER_MODEL:
            decision = await self.route(routing_text(request.messages), request)
            order = decision.eligible_models()
        elif request.model in self.backends:
            controls = [name for name in RoutingControls.model_fields if getattr(request, name) is not None]
            if controls:
                raise APIError(400, f"{controls} apply to model {ROUTER_MODEL!r} only; {request.model!r} names a pool model",
                               param=controls[0])
            decision, order = None, [request.model]
        else:
            raise APIError(404, f"the model {request.model!r} does not exist; use {ROUTER_MODEL!r} or one of {list(self.backends)}",
                           param="model", code="model_not_found")
        body, fallbacks, failed_engines = request.backend_body(), [], set()
        for model in order:
            backend = self.backends[model]
            if backend.spec.engine in failed_engines:
                continue  # the stand-in engine serves several pool models: one failure speaks for all of them
            if len(failed_engines) == self.max_attempts:
                break
            try:
                first, rest = await backend.start(body, request.stream)
            except BackendFailure as failure:
                logger.warning("backend %s failed, trying the next model: %s", model, failure)
                self.metrics.fallbacks.inc(tags={"model": model})
                fallbacks.append(Fallback(model=model, reason=str(failure)))
                failed_engines.add(backend.spec.engine)
                continue
            routing = RoutingInfo(decision=decision, fallbacks=fallbacks, stand_in=backend.spec.stand_in).model_dump()
            headers = self._answered(model, decision, fallbacks)
            if request.stream:
                return ChatResult(headers, stream=_event_stream(first, rest, model, routing))
            return ChatResult(headers, body={**first, "model": model, "routing": routing})
        tried = "; ".join(f"{failure.model}: {failure.reason}" for failure in fallbacks)
        raise APIError(503, f"no backend could answer ({tried})", type="service_unavailable", code="backends_unavailable")

    def _answered(self, model: str, decision: RoutingDecision | None, fallbacks: list[Fallback]) -> dict[str, str]:
        """Record the answer in the metrics; the routing headers of the response."""
        self.metrics.requests.inc(tags={"model": model, "routed": str(decision is not None).lower()})
        headers = {"x-router-model": model, "x-router-fallbacks": str(len(fallbacks))}
        if decision is not None:
            cost = decision.estimated_cost(model)
            self.metrics.estimated_cost.inc(cost, tags={"model": model})
            headers |= {"x-router-task": str(decision.task), "x-router-estimated-cost": f"{cost:.8g}"}
        return headers


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _event_stream(first: dict, rest: AsyncIterator[dict], model: str, routing: dict) -> AsyncIterator[str]:
    """The backend's chunks under the answering model's name, the routing in the first, then [DONE].

    A backend that breaks mid-stream cannot hand over to another model (the client has its output), so the
    stream ends with an error event, as vLLM's own server does.
    """
    yield _sse({**first, "model": model, "routing": routing})
    try:
        async for chunk in rest:
            yield _sse({**chunk, "model": model})
    except (BackendFailure, APIError) as error:
        logger.warning("backend %s failed mid-stream: %s", model, error)
        yield _sse({"error": {"message": f"{model} failed mid-stream: {error}", "type": "backend_error", "param": None, "code": None}})
    yield _sse("[DONE]")
