"""The Serve application: `build_app(args)` wires the ingress (which decides) -> Embedder, and the backend pool.

    serve run serve.config                 # the YAML names serve.app.builder:build_app and holds its args
    serve.run(build_app({...}))            # the same from Python

`args` is a `serve.app.app_config.RouterAppConfig` or its dict. The artifact is loaded here once to check it and to
read the pool before anything deploys; a missing or broken one stops the build with a message saying what
to do (and ends a waiting `serve run`: `serve.app.startup`).
"""

from __future__ import annotations

from ray.serve import Application

from serve.app.access import SpendLedger
from serve.app.app_config import RouterAppConfig
from serve.app.deployments import Embedder
from serve.app.ingress import RouterIngress
from serve.app.startup import stop_serve_run
from serve.backends.build import build_backends
from serve.core.artifact import ArtifactError, RouterArtifact


def load_artifact(config: RouterAppConfig) -> RouterArtifact:
    path = config.artifact_path()
    if not path.exists():
        raise ArtifactError(
            f"no router artifact at {path}: train one with "
            f"`python -m training fit --dataset llmrouter_9model --out {config.artifact}` "
            f"or point `artifact` in the app's args at an existing one")
    return RouterArtifact.load(path)


def build_app(args: RouterAppConfig | dict | None = None) -> Application:
    try:
        return _build(args)
    except ValueError as error:  # a bad config or artifact (ArtifactError, ValidationError): every retry fails alike
        stop_serve_run(str(error))
        raise


def _build(args: RouterAppConfig | dict | None) -> Application:
    config = args if isinstance(args, RouterAppConfig) else RouterAppConfig.model_validate(args or {})
    artifact = load_artifact(config)
    if config.default_policy == "cascade" and artifact.posthoc is None:
        raise ValueError(f"default_policy cascade: the artifact {artifact.path} has no post-hoc estimator to judge answers with "
                         "(its training data recorded no answers); fit one on a dataset with answers (`python -m training fit "
                         "--dataset routerbench_partial --out ...`), or set default_policy: route")
    # A backend may name a model ahead of the artifact that brings it into the pool (an artifact swap, below).
    models = artifact.models + [model for model in config.backends if model not in artifact.models]
    deployments, specs = build_backends(models, config.backends, config.local)
    ledger = SpendLedger.bind(config.access.spend_period_s) if config.access.spend_limit_usd is not None else None
    # The artifact travels as the ingress's `user_config`: serve.config's `deployments:` entry can set a new one, which
    # `serve deploy` swaps in place (its `reconfigure`), no replica restarted.
    return RouterIngress.options(user_config={"artifact": str(artifact.path)}).bind(
        Embedder.bind(artifact.embedder, config.embedder),
        deployments,
        specs,
        config,
        ledger,
    )
