"""The application's configuration: the `args` of `serve.config`, validated before anything deploys.

Per-deployment Serve options (replicas, `autoscaling_config`, `max_ongoing_requests`, `max_queued_requests`,
`ray_actor_options`) of the ingress and the Embedder are overridden in `serve.config`'s
`deployments:` list by name (`RouterIngress`, `Embedder`). Backends carry theirs here, in `deployment_config`, as Ray Serve
LLM's `LLMConfig` does, because their deployments are named after the model and built from this config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from serve.backends.backend_config import (
    Backend,
    CooldownConfig,
    LocalEngineConfig,
    StrictConfig,
)
from serve.core.decision import POLICIES, PRESETS


class EmbedderConfig(StrictConfig):
    """The Embedder's batches: whatever prompts wait when the encoder is free, up to `max_batch_size`."""

    max_batch_size: PositiveInt = 32
    # Under load batches fill while the previous one encodes; a wait only pays off where a batch costs little more
    # than one prompt (a GPU).
    batch_wait_timeout_s: NonNegativeFloat = 0
    device: str = "cpu"  # "cuda" on a GPU node
    # The encoder's torch threads; None: as Ray sets them from the replica's num_cpus (one for a fraction of a CPU).
    threads: PositiveInt | None = None


class AccessConfig(StrictConfig):
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


class LimitsConfig(StrictConfig):
    """Caps on what one request may ask for (413 for the body, 400 naming the field for the rest)."""

    max_body_bytes: PositiveInt = 4 * 2**20
    max_messages: PositiveInt = 256
    max_tokens: PositiveInt = 4096  # also caps max_completion_tokens
    max_n: PositiveInt = 4
    retry_after_s: PositiveInt = 1  # the Retry-After of a 503 for an overloaded app


class RouterAppConfig(StrictConfig):
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
