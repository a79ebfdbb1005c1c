"""The HTTP API's request and response models: OpenAI's chat shapes plus the router's own fields.

Routing controls travel in the request body beside the OpenAI fields (with the `openai` client:
`extra_body={"preset": "cheap"}`), so any OpenAI client can use them. Every other OpenAI parameter
(temperature, max_tokens, ...) is passed to the answering backend untouched.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from serve.core.capabilities import Needs, needs_of
from serve.core.decision import POLICIES, PRESETS
from serve.errors import APIError, invalid_request, validation_message  # noqa: F401  (part of the protocol's surface)

ROUTER_MODEL = "router"  # the `model` name that asks the router to choose
NOT_A_CANDIDATE = "not among the candidates"  # why a model left out by the request's `candidates` is not eligible
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


def check_json_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """`schema` when it is a valid JSON schema (a malformed one would fail only at the backend, or not at all)."""
    if schema is not None:
        from jsonschema import SchemaError, validators

        try:
            validators.validator_for(schema).check_schema(schema)
        except SchemaError as error:
            raise ValueError(f"not a valid JSON schema: {error.message}") from None
    return schema


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema

    _valid_schema = field_validator("parameters")(check_json_schema)


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    json_schema: dict[str, Any] = Field(alias="schema")

    _valid_schema = field_validator("json_schema")(check_json_schema)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with a name and a schema")
        return self


class ToolUse(BaseModel):
    """The OpenAI fields that ask for what not every model can do: checked here, so that a malformed one gets a 400
    naming it before any routing, and read for the request's needs (`serve.core.capabilities`)."""

    tools: list[Tool] | None = None
    functions: list[FunctionDefinition] | None = None  # the older form of tools
    response_format: ResponseFormat | None = None


class OutputSize(BaseModel):
    """The OpenAI fields that size the answer: the app caps them, and the ranking checks context windows."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)

    def output_tokens(self) -> int:
        """The most tokens one answer may take (0 when the request does not say)."""
        return self.max_completion_tokens or self.max_tokens or 0


class ChatCompletionRequest(RoutingControls, OutputSize, ToolUse):
    model_config = ConfigDict(extra="allow")  # the rest of the OpenAI parameters

    model: str = Field(examples=[ROUTER_MODEL])
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False

    def backend_body(self) -> dict:
        """The OpenAI request a backend gets: everything the client sent except the routing controls."""
        return self.model_dump(exclude_unset=True, by_alias=True, exclude=set(RoutingControls.model_fields) | {"model"})

    def needs(self) -> Needs:
        return needs_of(self.model_dump(exclude_unset=True, by_alias=True), self.output_tokens())


COMPLETION_ONLY = ("echo", "suffix", "best_of", "logprobs")  # legacy completion fields a chat has no equivalent of


class CompletionRequest(RoutingControls, OutputSize):
    """The legacy completions API: its prompt becomes the one user message of a chat request."""

    model_config = ConfigDict(extra="allow")  # the rest of the OpenAI parameters

    model: str = Field(examples=[ROUTER_MODEL])
    prompt: str | list[str]
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("give one prompt (a string, or a list of one string); send several prompts as several requests")
            prompt = prompt[0]
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt

    def as_chat(self) -> ChatCompletionRequest:
        """The chat request that answers this completion request; 400 naming a field a chat cannot take."""
        unsupported = [name for name in COMPLETION_ONLY if (self.model_extra or {}).get(name)]
        if unsupported:
            raise APIError(400, f"{unsupported[0]}: not supported, as /v1/completions is answered as a chat of one user "
                                "message; use /v1/chat/completions", param=unsupported[0])
        body = {**self.model_dump(exclude_unset=True, exclude={"prompt"}), "messages": [{"role": "user", "content": self.prompt}]}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as error:
            raise invalid_request(error) from None


def text_completion(chat: dict) -> dict:
    """A chat completion, or a chunk of one, in the shape of a text completion (each choice's text is its content)."""
    choices = [{"index": choice.get("index", 0), "text": (choice.get("message") or choice.get("delta") or {}).get("content") or "",
                "finish_reason": choice.get("finish_reason"), "logprobs": None} for choice in chat.get("choices", [])]
    return {**chat, "object": "text_completion", "choices": choices}


class RouteRequest(RoutingControls, OutputSize, ToolUse):
    """A prompt, or the body a client sends to /v1/chat/completions: its generation fields are ignored, except
    those that size the answer (a model whose context window cannot hold prompt and answer is not eligible) and
    those that need a capability (`tools`, `response_format`, image parts: a model without it is not eligible)."""

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

    def needs(self) -> Needs:
        return needs_of(self.model_dump(exclude_unset=True, by_alias=True), self.output_tokens())


class RankedModel(BaseModel):
    model: str
    predicted_quality: float
    estimated_cost: float  # USD
    eligible: bool  # allowed by the candidate list, under the cost cap, able to serve the request (capabilities, context)
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

    def candidates(self) -> list[str]:
        """The models the decision was asked to choose among."""
        return [entry.model for entry in self.ranking if entry.ineligible_because != NOT_A_CANDIDATE]

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
