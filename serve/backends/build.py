"""The backends behind the pool: which deployment answers each pool model, built from the app's config.

Kinds `local` (one shared vLLM-CPU stand-in) and `vllm` are Ray Serve LLM deployments (`LLMServer`); kind
`openai` is an `OpenAIEndpoint` deployment in front of an OpenAI-compatible HTTP server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ray import serve

from serve.backends.backend_config import (
    Backend,
    LocalBackend,
    LocalEngineConfig,
    OpenAIBackend,
    VLLMBackend,
)
from serve.backends.capabilities import pool_capabilities
from serve.backends.openai_endpoint import OpenAIEndpoint
from serve.backends.retry import RetryPolicy
from serve.backends.stand_in import STAND_IN_MODEL_ID, STAND_IN_NAME, stand_in_source
from serve.core.capabilities import Capabilities
from serve.core.paths import cache_dir

LOCAL_BACKEND = "local"  # the backend id of the shared stand-in


def local_llm_config(engine: LocalEngineConfig):
    """The Ray Serve LLM config of the shared stand-in engine on vLLM-CPU."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": STAND_IN_MODEL_ID, "model_source": str(stand_in_source(engine.model_source))},
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1}]},  # the vLLM worker, pinned to one core
        engine_kwargs={"enforce_eager": True, "max_model_len": engine.max_model_len, "dtype": "bfloat16", **engine.engine_kwargs},
        deployment_config=engine.deployment_config,
        runtime_env={"env_vars": {
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
            "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),
        }},
        log_engine_metrics=False,
    )


def vllm_llm_config(model: str, backend: VLLMBackend):
    """The Ray Serve LLM config of a pool model on its own vLLM engine, served under the pool name."""
    from ray.serve.llm import LLMConfig

    options = {"placement_group_config": backend.placement_group_config} if backend.placement_group_config else {}
    return LLMConfig(
        model_loading_config={"model_id": model, "model_source": backend.model_source},
        accelerator_type=backend.accelerator_type,
        engine_kwargs=backend.engine_kwargs,
        deployment_config=backend.deployment_config,
        runtime_env=backend.runtime_env,
        **options,
    )


@dataclass(frozen=True)
class BackendSpec:
    """How the ingress reaches one pool model: which backend (deployment) answers it, under which name."""

    backend_id: str  # key of the deployment handle; cool-down and readiness are kept per backend_id
    served_model: str  # the name the backend knows the model by
    transport: Literal["ray-serve-llm", "openai-http"]
    timeout_s: float
    capabilities: Capabilities  # what the model can take (its context window among them)
    stand_in: str | None = None


def build_backends(models: list[str], backends: Mapping[str, Backend], local: LocalEngineConfig
                   ) -> tuple[dict[str, Any], dict[str, BackendSpec]]:
    """(backend id -> bound deployment, pool model -> spec); a model absent from `backends` is `local`, and the
    `local` models share one backend (one vLLM engine)."""
    from ray.serve.llm import build_llm_deployment

    deployments: dict[str, Any] = {}
    specs: dict[str, BackendSpec] = {}
    capabilities = pool_capabilities(models, backends, local)
    for model in models:
        backend = backends.get(model, LocalBackend())
        if backend.kind == "local":
            if LOCAL_BACKEND not in deployments:
                deployments[LOCAL_BACKEND] = build_llm_deployment(local_llm_config(local), name_prefix="StandIn:")
            specs[model] = BackendSpec(LOCAL_BACKEND, STAND_IN_MODEL_ID, "ray-serve-llm", local.timeout_s,
                                       capabilities[model], stand_in=STAND_IN_NAME)
        elif backend.kind == "vllm":
            deployments[model] = build_llm_deployment(vllm_llm_config(model, backend), name_prefix="VLLM:")
            specs[model] = BackendSpec(model, model, "ray-serve-llm", backend.timeout_s, capabilities[model])
        else:
            deployments[model] = openai_deployment(model, backend)
            specs[model] = BackendSpec(model, backend.model or model, "openai-http", backend.timeout_s, capabilities[model])
    return deployments, specs


def openai_deployment(model: str, backend: OpenAIBackend):
    deployment = serve.deployment(OpenAIEndpoint).options(name=f"OpenAI:{model}", **backend.deployment_config)
    return deployment.bind(backend.base_url, backend.api_key_env, backend.timeout_s,
                           RetryPolicy(retries=backend.max_retries, backoff_s=backend.retry_backoff_s))
