"""The HTTP API's request and response models: OpenAI's chat shapes plus the router's own fields.

Routing controls travel in the request body beside the OpenAI fields (with the `openai` client:
`extra_body={"preset": "cheap"}`), so any OpenAI client can use them. Every other OpenAI parameter
(temperature, max_tokens, ...) is passed to the answering backend untouched.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.core.decision import POLICIES, PRESETS
from serve.errors import APIError, validation_message  # noqa: F401  (part of the protocol's surface)

ROUTER_MODEL = "router"  # the `model` name that asks the router to choose
# route: the router picks one model, which answers. cascade: the router asks models one at a time, judges each
# answer, and returns the best once another answer is not worth its cost (the artifact needs a post-hoc estimator).


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... go to the backend as they are

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The text of the message (the text parts of a content array)."""
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content if part.get("type") == "text" and isinstance(part.get("text"), str))
        return self.content or ""


class RoutingControls(BaseModel):
    """How the router trades quality for cost on this request."""

    cost_weight: float | None = Field(None, ge=0, description="quality given up per cost of one call of the pool's dearest model")
    preset: Literal[tuple(PRESETS)] | None = Field(None, description=f"a named cost weight: {PRESETS}")
    candidates: list[str] | None = Field(None, min_length=1, description="route among these pool models only")
    max_cost: float | None = Field(None, gt=0, description="USD per request, on the router's estimate")
    policy: Literal[POLICIES] | None = Field(None, description="route (one model answers) or cascade (answers judged, "
                                                                "escalated while it pays); default: the app's default_policy")

    @model_validator(mode="after")
    def _one_knob(self):
        if self.cost_weight is not None and self.preset is not None:
            raise ValueError("set either cost_weight or preset, not both")
        return self

    def resolved_cost_weight(self, default_preset: str) -> float:
        if self.cost_weight is not None:
            return self.cost_weight
        return PRESETS[self.preset or default_preset]


def routing_text(messages: list[ChatMessage]) -> str:
    """What the router embeds: the last user message.

    The router was trained on single user turns, so the last user turn is the closest match to its training
    prompts; system prompts and earlier turns would shift the embedding away from anything it has seen.
    """
    for message in reversed(messages):
        if message.role == "user" and message.text().strip():
            return message.text()
    raise APIError(400, "routing needs a user message with text content", param="messages")


class OutputSize(BaseModel):
    """The OpenAI fields that size the answer: the app caps them, and the ranking checks context windows."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)

    def output_tokens(self) -> int:
        """The most tokens one answer may take (0 when the request does not say)."""
        return self.max_completion_tokens or self.max_tokens or 0


class ChatCompletionRequest(RoutingControls, OutputSize):
    model_config = ConfigDict(extra="allow")  # the rest of the OpenAI parameters

    model: str = Field(examples=[ROUTER_MODEL])
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False

    def backend_body(self) -> dict:
        """The OpenAI request a backend gets: everything the client sent except the routing controls."""
        return self.model_dump(exclude_unset=True, exclude=set(RoutingControls.model_fields) | {"model"})


class RouteRequest(RoutingControls, OutputSize):
    """A prompt, or the body a client sends to /v1/chat/completions: its generation fields are ignored, except
    those that size the answer (a model whose context window cannot hold prompt and answer is not eligible)."""

    model_config = ConfigDict(extra="ignore")

    model: Literal[ROUTER_MODEL] | None = Field(None, description=f"{ROUTER_MODEL!r} when given")
    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def text(self) -> str:
        return self.prompt if self.prompt is not None else routing_text(self.messages)


class RankedModel(BaseModel):
    model: str
    predicted_quality: float
    estimated_cost: float  # USD
    eligible: bool  # allowed by the candidate list, under the cost cap, and holding prompt and answer
    ineligible_because: str | None = None  # why not, when not


class RoutingDecision(BaseModel):
    """The router's decision for one prompt: the pool ranked best first."""

    task: int  # the most likely latent task
    task_probability: float
    cost_weight: float
    prompt_tokens: int
    ranking: list[RankedModel]
    decision_ms: float  # time the Ranker spent deciding (not counting the embedding)

    def eligible_models(self) -> list[str]:
        """The models to try in turn: the eligible ones, best first."""
        return [entry.model for entry in self.ranking if entry.eligible]

    def estimated_cost(self, model: str) -> float:
        return next(entry.estimated_cost for entry in self.ranking if entry.model == model)


class RouteResponse(RoutingDecision):
    object: Literal["route"] = "route"
    model: str  # the model a chat request would go to first


class Fallback(BaseModel):
    model: str
    reason: str


class CascadeRun(BaseModel):
    """One model a cascade asked, in order."""

    model: str
    posthoc_quality: float  # its answer's estimated quality, judged against every answer the cascade obtained
    estimated_cost: float  # USD


class RoutingInfo(BaseModel):
    """The `routing` field of every chat response (the first chunk's when streamed)."""

    decision: RoutingDecision | None  # None when the request named a pool model itself
    fallbacks: list[Fallback] = []  # the models that failed before `model` answered, in order
    stand_in: str | None = None  # the local model that generated the answer in place of `model`
    policy: Literal[POLICIES] | None = None  # how the router answered; None when the request named a pool model
    cascade: list[CascadeRun] | None = None  # under `cascade`: every model asked, in order; `model` gave the answer
    note: str | None = None  # why the policy differs from the one asked for


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "finerouter"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
