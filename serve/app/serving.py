"""The serving logic behind the HTTP routes: check the request, decide, then answer with the best model that works.

Kept apart from FastAPI (as vLLM keeps `serving_chat` apart from its `api_server`), so the routes in
`serve.app.ingress` stay a thin translation between HTTP and these calls.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from serve.app.app_config import RouterAppConfig
from serve.app.protocol import (
    NOT_A_CANDIDATE,
    ROUTER_MODEL,
    APIError,
    CascadeRun,
    ChatCompletionRequest,
    ChatMessage,
    Fallback,
    ModelCard,
    ModelList,
    OutputSize,
    RoutingControls,
    RoutingDecision,
    RoutingInfo,
    routing_text,
    text_completion,
)
from serve.app.ranker import Ranker
from serve.backends.cooldown import Cooldowns
from serve.backends.failures import BackendFailure
from serve.backends.pool import PoolBackend
from serve.core.answer_facts import answer_opening
from serve.core.capabilities import Needs, shortfall
from serve.errors import error_body

logger = logging.getLogger("ray.serve")
LOGGED_PROMPT_CHARS = 500


@dataclass(frozen=True)
class Caller:
    """Who sent the request: the id its log lines carry, and its API key's id (None when the app is open)."""

    request_id: str
    key: str | None = None


@dataclass
class ChatResult:
    """A chat answer for the HTTP layer: a completion body, or an SSE stream; headers either way."""

    headers: dict[str, str]
    body: dict | None = None
    stream: AsyncIterator[str] | None = None


@dataclass(frozen=True)
class Attempt:
    """One call of a backend: its first output and the rest, or why it gave none (`cooling`: it was not asked)."""

    output: tuple[dict, AsyncIterator[dict]] | None = None
    failure: str | None = None
    cooling: bool = False


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
    decision_latency: Histogram = field(default_factory=lambda: Histogram(
        "finerouter_decision_latency_ms", description="Time of one routing decision (features, MoE, ranking), embedding aside.",
        boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50]))


def check_limits(request: OutputSize, messages: list[ChatMessage] | None, config: RouterAppConfig) -> None:
    """400 naming the field when the request asks for more than the app allows."""
    limits = config.limits
    if messages is not None and len(messages) > limits.max_messages:
        raise APIError(400, f"messages: {len(messages)} messages, more than the {limits.max_messages} allowed", param="messages")
    for name, cap in (("max_tokens", limits.max_tokens), ("max_completion_tokens", limits.max_tokens), ("n", limits.max_n)):
        value = getattr(request, name)
        if value is not None and value > cap:
            raise APIError(400, f"{name}: {value} is over the limit of {cap}", param=name)


COOLING_DOWN = "cooling down after repeated failures"
UNSUPPORTED = "unsupported_capability"  # the code of a 400 for a request no candidate has the capability for
NO_ESTIMATOR = ("routed: the router artifact has no post-hoc estimator to judge answers with (its training data recorded "
                "no answers), so a cascade is not available")


class RoutedChat:
    def __init__(self, embedder: DeploymentHandle, backends: dict[str, PoolBackend], config: RouterAppConfig,
                 ledger: DeploymentHandle | None = None):
        self.embedder, self.backends, self.config, self.ledger = embedder, backends, config, ledger
        self.ranker: Ranker | None = None  # the artifact served now (`use`); `backends` may hold more models than its pool
        self.cooldowns = Cooldowns(config.cooldown)
        self.metrics = _Metrics()

    def use(self, artifact: str) -> None:
        """Decide with the artifact at this path from the next request on (at start, and on a live swap). Each of its
        models needs a backend, configured when the app was built. Requests under way keep their Ranker and backends."""
        ranker = Ranker.load(artifact, {model: backend.spec.capabilities for model, backend in self.backends.items()})
        missing = [model for model in ranker.models if model not in self.backends]
        if missing:
            raise ValueError(f"{artifact}: no backend for {missing}; add them under `backends` in the app's args "
                             f"(or leave them out to use the local stand-in) and deploy that first")
        self.ranker = ranker

    @property
    def pool(self) -> list[str]:
        """The models served now."""
        return self.ranker.models

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=ROUTER_MODEL)] + [ModelCard(id=model) for model in self.pool])

    async def readiness(self) -> dict[str, bool]:
        """Backend id -> whether it answers its health check now."""
        answering = {backend.spec.backend_id: backend for backend in self.backends.values()}
        return dict(zip(answering, await asyncio.gather(*(backend.ready() for backend in answering.values()))))

    def backend_states(self) -> list[dict]:
        return [{"model": model, "backend": self.backends[model].spec.backend_id, **self.cooldowns.status(self.backends[model].spec.backend_id)}
                for model in self.pool]

    async def route(self, text: str, controls: RoutingControls, needs: Needs, caller: Caller,
                    ranker: Ranker | None = None) -> RoutingDecision:
        """The ranking by `ranker` (by default the one served now); 400 naming the field when no candidate can serve
        the request."""
        decision = await self._rank(ranker or self.ranker, text, controls, needs, caller)
        if not decision.eligible_models():
            raise self._unservable(decision, needs.with_prompt_tokens(decision.prompt_tokens))
        return decision

    def _unservable(self, decision: RoutingDecision, needs: Needs) -> APIError:
        """The 400 for a request no candidate can serve: the field most of them lack, and each one's reason."""
        considered = [entry for entry in decision.ranking if entry.ineligible_because != NOT_A_CANDIDATE]
        lacking = [shortfall(self.backends[entry.model].spec.capabilities, needs) for entry in considered]
        fields = collections.Counter(reason.field for reason in lacking if reason is not None)
        param = fields.most_common(1)[0][0] if fields else "messages"
        reasons = "; ".join(f"{entry.model}: {entry.ineligible_because}" for entry in considered)
        if param == "messages":
            return APIError(400, f"no model can take this request ({reasons}); shorten the prompt or lower max_tokens",
                            param=param, code="context_length_exceeded")
        return APIError(400, f"{param}: none of the models considered can serve it ({reasons}); leave the field out, or "
                             "send the request to a pool that declares the capability", param=param, code=UNSUPPORTED)

    async def _rank(self, ranker: Ranker, text: str, controls: RoutingControls, needs: Needs, caller: Caller) -> RoutingDecision:
        if controls.candidates is not None:
            unknown = sorted(set(controls.candidates) - set(ranker.models))
            if unknown:
                raise APIError(400, f"unknown candidates {unknown}; the pool is {ranker.models}", param="candidates")
        if self.config.access.log_prompts:
            logger.info("request %s: routing prompt %r", caller.request_id, text[:LOGGED_PROMPT_CHARS])
        embedding, prompt_tokens = await self._within_capacity(self.embedder.embed.remote(text))
        decision = await asyncio.to_thread(ranker.decide, embedding, prompt_tokens, text,
                                           controls.resolved_cost_weight(self.config.default_preset),
                                           controls.candidates or ranker.models, controls.max_cost, needs)
        self.metrics.decision_latency.observe(decision.decision_ms)
        return decision

    async def _within_capacity(self, call):
        """The result of a call to the Embedder; 503 when its queue is full."""
        try:
            return await call
        except BackPressureError:
            raise APIError(503, "the router is overloaded; retry shortly", type="service_unavailable", code="overloaded",
                           retry_after_s=self.config.limits.retry_after_s) from None

    async def chat(self, request: ChatCompletionRequest, caller: Caller) -> ChatResult:
        check_limits(request, request.messages, self.config)
        await self._check_spend(caller)
        note, needs = None, request.needs()
        if request.model == ROUTER_MODEL:
            ranker = self.ranker  # decides, and judges the cascade's answers, though another is swapped in meanwhile
            decision = await self.route(routing_text(request.messages), request, needs, caller, ranker)
            if (request.policy or self.config.default_policy) == "cascade":
                if ranker.cascades:
                    return await self._cascade(request, ranker, decision, needs, caller)
                note = NO_ESTIMATOR
            order, cost = decision.eligible_models(), decision.estimated_cost
        elif request.model in self.pool:
            controls = [name for name in RoutingControls.model_fields if getattr(request, name) is not None]
            if controls:
                raise APIError(400, f"{controls} apply to model {ROUTER_MODEL!r} only; {request.model!r} names a pool model",
                               param=controls[0])
            lacking = shortfall(self.backends[request.model].spec.capabilities, needs)
            if lacking is not None:
                raise APIError(400, f"{lacking.field}: {request.model} cannot serve it ({lacking.reason}); use model "
                               f"{ROUTER_MODEL!r} to be routed to a model that can", param=lacking.field, code=UNSUPPORTED)
            decision, order, cost = None, [request.model], None
            if self.ledger is not None and caller.key is not None:  # spend is counted on the router's estimate
                cost = (await self._rank(self.ranker, routing_text(request.messages), RoutingControls(), Needs(), caller)).estimated_cost
        else:
            raise APIError(404, f"the model {request.model!r} does not exist; use {ROUTER_MODEL!r} or one of {self.pool}",
                           param="model", code="model_not_found")
        return await self._answer(request, order, decision, cost, caller, note)

    async def _answer(self, request: ChatCompletionRequest, order: list[str], decision: RoutingDecision | None,
                      cost: Callable[[str], float] | None, caller: Caller, note: str | None = None) -> ChatResult:
        body, fallbacks, tried, cooling = request.backend_body(), [], set(), set()
        for model in order:
            backend = self.backends[model]
            backend_id = backend.spec.backend_id
            if backend_id in tried or backend_id in cooling:
                continue  # the stand-in backend serves several pool models: one failure speaks for all of them
            if len(tried) == self.config.max_attempts:
                break
            attempt = await self._attempt(model, body, request.stream, caller)
            (cooling if attempt.cooling else tried).add(backend_id)
            if attempt.failure is not None:
                fallbacks.append(Fallback(model=model, reason=attempt.failure))
                continue
            first, rest = attempt.output
            estimated_cost = cost(model) if cost is not None else None
            if estimated_cost is not None and self.ledger is not None and caller.key is not None:
                await self.ledger.charge.remote(caller.key, estimated_cost)
            routing = RoutingInfo(decision=decision, fallbacks=fallbacks, stand_in=backend.spec.stand_in,
                                  policy=None if decision is None else "route", note=note).model_dump()
            headers = self._answered(model, decision, fallbacks, estimated_cost)
            if request.stream:
                return ChatResult(headers, stream=_event_stream(first, rest, model, routing, caller,
                                                                functools.partial(self.cooldowns.failed, backend_id)))
            return ChatResult(headers, body={**first, "model": model, "routing": routing})
        retry_after = min((self.cooldowns.seconds_left(backend_id) for backend_id in cooling), default=None) if not tried else None
        raise _unanswered(fallbacks, retry_after or self.config.limits.retry_after_s)

    async def _cascade(self, request: ChatCompletionRequest, ranker: Ranker, decision: RoutingDecision, needs: Needs,
                       caller: Caller) -> ChatResult:
        """Cascade routing: ask the model `ranker` picks, without streaming; have its answer embedded (Embedder)
        and every answer so far judged (`ranker`, the one that made `decision`); go on until it stops, then return
        the best answer (streamed when asked). A failed or cooling backend is not asked again, as under routing, and
        after `max_attempts` failures the cascade stops with the best answer it has."""
        body = {name: value for name, value in request.backend_body().items() if name not in ("stream", "stream_options")}
        completions: dict[str, dict] = {}  # in the order the models were asked
        answers: dict[str, tuple[str, object]] = {}
        unavailable: set[str] = set()
        fallbacks: list[Fallback] = []
        while len(fallbacks) < self.config.max_attempts:
            verdict = await asyncio.to_thread(ranker.judge, decision, request.max_cost, needs, answers, sorted(unavailable))
            if verdict.next_model is None:
                break
            model = verdict.next_model
            attempt = await self._attempt(model, body, False, caller)
            if attempt.failure is None:
                completions[model] = attempt.output[0]
                text = completions[model]["choices"][0]["message"].get("content") or ""
                embedding, _ = await self._within_capacity(self.embedder.embed.remote(answer_opening(text)))
                answers[model] = (text, embedding)
                continue
            fallbacks.append(Fallback(model=model, reason=attempt.failure))
            # The stand-in backend serves several pool models: one failure speaks for all of them.
            backend_id = self.backends[model].spec.backend_id
            unavailable |= {name for name, backend in self.backends.items() if backend.spec.backend_id == backend_id}
        if verdict.answer is None:
            raise _unanswered(fallbacks, self.config.limits.retry_after_s)
        model = verdict.answer
        runs = [CascadeRun(model=name, posthoc_quality=verdict.posthoc_quality[name], estimated_cost=decision.estimated_cost(name))
                for name in completions]
        total_cost = sum(run.estimated_cost for run in runs)
        if self.ledger is not None and caller.key is not None:
            await self.ledger.charge.remote(caller.key, total_cost)
        routing = RoutingInfo(decision=decision, fallbacks=fallbacks, stand_in=self.backends[model].spec.stand_in, policy="cascade",
                              cascade=runs).model_dump()
        headers = self._answered(model, decision, fallbacks, total_cost, list(completions))
        if request.stream:
            include_usage = bool((request.model_extra.get("stream_options") or {}).get("include_usage"))
            return ChatResult(headers, stream=_completion_events(completions[model], model, routing, include_usage))
        return ChatResult(headers, body={**completions[model], "model": model, "routing": routing})

    async def _attempt(self, model: str, body: dict, stream: bool, caller: Caller) -> Attempt:
        """One call of a pool model's backend, kept in its cool-down state and the metrics. Raises APIError when the
        backend refused the request itself (another model would refuse it too)."""
        backend = self.backends[model]
        backend_id = backend.spec.backend_id
        if not self.cooldowns.admit(backend_id):
            return Attempt(failure=COOLING_DOWN, cooling=True)
        try:
            output = await backend.start(body, stream, caller.request_id)
        except BackendFailure as failure:
            logger.warning("request %s: backend %s failed (%s), going on without it: %s",
                           caller.request_id, model, failure.reason, failure.detail or "-")
            self.cooldowns.failed(backend_id)
            self.metrics.fallbacks.inc(tags={"model": model})
            return Attempt(failure=failure.reason)
        except APIError as refusal:  # the backend is up; the request is at fault
            self.cooldowns.succeeded(backend_id)
            refusal.message = f"{model} refused the request: {refusal.message}"
            raise
        self.cooldowns.succeeded(backend_id)
        return Attempt(output=output)

    async def _check_spend(self, caller: Caller) -> None:
        limit = self.config.access.spend_limit_usd
        if self.ledger is None or caller.key is None or limit is None:
            return
        if await self.ledger.spent_usd.remote(caller.key) >= limit:
            resets_in = await self.ledger.seconds_left_in_period.remote()
            raise APIError(429, f"this API key has spent its limit of {limit:g} USD (the router's estimate) for the period; "
                           f"it resets in {resets_in:.0f} s", type="insufficient_quota", code="insufficient_quota",
                           retry_after_s=resets_in)

    def _answered(self, model: str, decision: RoutingDecision | None, fallbacks: list[Fallback],
                  estimated_cost: float | None, cascade: list[str] | None = None) -> dict[str, str]:
        """Record the answer in the metrics; the routing headers of the response. Under a cascade (`cascade`: the
        models asked), the estimated cost is the total over every model asked."""
        self.metrics.requests.inc(tags={"model": model, "routed": str(decision is not None).lower()})
        headers = {"x-router-model": model, "x-router-fallbacks": str(len(fallbacks))}
        if estimated_cost is not None:
            self.metrics.estimated_cost.inc(estimated_cost, tags={"model": model})
            headers["x-router-estimated-cost"] = f"{estimated_cost:.8g}"
        if decision is not None:
            headers["x-router-task"] = str(decision.task)
            headers["x-router-policy"] = "route" if cascade is None else "cascade"
        if cascade:
            headers["x-router-cascade"] = ",".join(cascade)
        return headers


def _unanswered(fallbacks: list[Fallback], retry_after_s: float) -> APIError:
    tried = "; ".join(f"{failure.model}: {failure.reason}" for failure in fallbacks)
    return APIError(503, f"no backend could answer ({tried or 'no eligible model'})", type="service_unavailable",
                    code="backends_unavailable", retry_after_s=retry_after_s)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _event_stream(first: dict, rest: AsyncIterator[dict], model: str, routing: dict, caller: Caller,
                        on_failure: Callable[[], None]) -> AsyncIterator[str]:
    """The backend's chunks under the answering model's name, the routing in the first, then [DONE].

    A backend that breaks mid-stream cannot hand over to another model (the client has its output), so the
    stream ends with an error event, as vLLM's own server does.
    """
    yield _sse({**first, "model": model, "routing": routing})
    try:
        async for chunk in rest:
            yield _sse({**chunk, "model": model})
    except BackendFailure as failure:
        logger.warning("request %s: backend %s failed mid-stream (%s): %s", caller.request_id, model, failure.reason,
                       failure.detail or "-")
        on_failure()
        yield _sse(error_body(f"{model} failed mid-stream: {failure.reason}", "backend_error"))
    except APIError as error:
        yield _sse(error.body())
    yield _sse("[DONE]")


async def text_completion_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A chat completion's SSE events as a text completion's (the error events and [DONE] as they are)."""
    async for event in events:
        payload = event.removeprefix("data: ").strip()
        if payload.startswith("{") and '"choices"' in payload:
            yield _sse(text_completion(json.loads(payload)))
        else:
            yield event


async def _completion_events(completion: dict, model: str, routing: dict, include_usage: bool) -> AsyncIterator[str]:
    """A finished completion as the events of a stream (a cascade streams its answer once it has chosen it): each
    choice's whole message in one chunk, the routing in the first, then the finish reasons, the usage when asked,
    and [DONE]."""
    chunk = {"id": completion.get("id"), "object": "chat.completion.chunk", "created": completion.get("created", 0), "model": model}
    choices = completion["choices"]
    yield _sse({**chunk, "routing": routing, "choices": [
        {"index": choice["index"], "delta": {"role": "assistant", "content": choice["message"].get("content")}, "finish_reason": None}
        for choice in choices]})
    yield _sse({**chunk, "choices": [{"index": choice["index"], "delta": {}, "finish_reason": choice.get("finish_reason")}
                                     for choice in choices]})
    if include_usage and completion.get("usage"):
        yield _sse({**chunk, "choices": [], "usage": completion["usage"]})
    yield _sse("[DONE]")
