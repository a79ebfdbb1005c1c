"""Shared set-up of the tests that deploy the Serve app: the router artifact, and one app on a loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "artifacts" / "llmrouter_9model"
TOOLS_TEMPLATE = REPO / "tests" / "data" / "smollm2_tools.jinja"
# The stand-in engine with vLLM's tool parser and a template that shows SmolLM2 the tools: tool-capable. The strict
# level pins each call's arguments to its tool's schema (SmolLM2-135M alone often writes arguments that no client parses).
TOOL_CALLING_ENGINE = {"engine_kwargs": {"enable_auto_tool_choice": True, "tool_call_parser": "hermes",
                                         "tool_strict_level": "parameter", "chat_template": str(TOOLS_TEMPLATE)}}
_trained: dict[str, Path] = {}


def router_artifact(scratch: Path) -> Path:
    """The shipped artifact when it loads, else one trained into `scratch` (1-2 min), once per test session."""
    from serve.core.artifact import ArtifactError, RouterArtifact

    try:
        RouterArtifact.load(ARTIFACT)
        return ARTIFACT
    except ArtifactError:
        pass
    if "llmrouter_9model" not in _trained:
        from training.__main__ import main

        path = scratch / "llmrouter_9model"
        assert main(["fit", "--dataset", "llmrouter_9model", "--out", str(path), "--trainer", "local"]) == 0
        _trained["llmrouter_9model"] = path
    return _trained["llmrouter_9model"]


@contextlib.contextmanager
def deployed(config: dict, name: str) -> Iterator[str]:
    """The app built from `config` (the `args` of serve.config) on a free loopback port: its base URL."""
    from ray import serve

    from serve.app.builder import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
