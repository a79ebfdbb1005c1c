"""Each pool model's capabilities, from its backend's config: what is declared, else the default of its kind.

- `local` (the shared stand-in engine): tool calls when the engine has vLLM's tool parser (`enable_auto_tool_choice`
  and `tool_call_parser` in `local.engine_kwargs`) and its chat template shows the model the tools (SmolLM2's own
  template does not); structured output, which vLLM's structured outputs give any model; no image input.
- `vllm`: tool calls from the same engine settings; structured output; image input only where declared.
- `openai`: what the config declares; nothing else is checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from serve.backends.backend_config import Backend, LocalBackend, LocalEngineConfig
from serve.backends.stand_in import stand_in_source
from serve.core.capabilities import Capabilities

TOOLS_IN_TEMPLATE = re.compile(r"\btools\b")


def engine_parses_tools(engine_kwargs: Mapping[str, Any]) -> bool:
    """Whether a vLLM engine turns model output into tool calls (and so accepts requests with `tools`)."""
    return bool(engine_kwargs.get("enable_auto_tool_choice") and engine_kwargs.get("tool_call_parser"))


def chat_template(engine_kwargs: Mapping[str, Any], model_folder: Path | None) -> str | None:
    """The chat template the engine applies: engine_kwargs' `chat_template` (a file, or the template itself), else the
    model folder's (chat_template.jinja or tokenizer_config.json); None when it cannot be read here."""
    configured = engine_kwargs.get("chat_template")
    if configured:
        path = Path(configured).expanduser()
        return path.read_text() if path.is_file() else str(configured)
    if model_folder is None or not model_folder.is_dir():
        return None
    if (model_folder / "chat_template.jinja").is_file():
        return (model_folder / "chat_template.jinja").read_text()
    config = model_folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        return "\n".join(entry.get("template", "") for entry in template)
    return template


def engine_capabilities(engine_kwargs: Mapping[str, Any], model_folder: Path | None) -> Capabilities:
    """What a vLLM engine can do: tool calls need its tool parser and a template that shows the model the tools
    (when the template cannot be read here, the parser settings decide)."""
    template = chat_template(engine_kwargs, model_folder)
    tools = engine_parses_tools(engine_kwargs) and (template is None or TOOLS_IN_TEMPLATE.search(template) is not None)
    return Capabilities(tools=tools, json_schema=True)


def capabilities_of(model: str, backend: Backend, local: LocalEngineConfig, stand_in_folder: Path | None) -> Capabilities:
    """The capabilities of pool model `model`: its declared ones over its kind's defaults. Raises ValueError for a
    declaration the engine cannot honour (tool calls without a tool parser)."""
    if backend.kind == "local":
        engine_kwargs = local.engine_kwargs
        default = replace(engine_capabilities(engine_kwargs, stand_in_folder), image_input=False)
    elif backend.kind == "vllm":
        engine_kwargs = backend.engine_kwargs
        default = engine_capabilities(engine_kwargs, Path(backend.model_source).expanduser())
    else:
        engine_kwargs, default = None, Capabilities()
    declared = backend.capabilities
    if declared.tools and engine_kwargs is not None and not engine_parses_tools(engine_kwargs):
        where = "local.engine_kwargs" if backend.kind == "local" else f"backends.{model}.engine_kwargs"
        raise ValueError(f"backends.{model}.capabilities.tools: true, but its engine has no tool parser: set "
                         f"enable_auto_tool_choice: true and tool_call_parser in {where}")
    overrides = {name: value for name, value in declared.model_dump().items() if value is not None}
    return replace(default, context_window=context_window(backend, local), **overrides)


def pool_capabilities(models: list[str], backends: Mapping[str, Backend], local: LocalEngineConfig) -> dict[str, Capabilities]:
    """Every pool model's capabilities, without building a deployment (the batch job reads the pool this way)."""
    pool = {model: backends.get(model, LocalBackend()) for model in models}
    stand_in_folder = stand_in_source(local.model_source) if any(b.kind == "local" for b in pool.values()) else None
    return {model: capabilities_of(model, backend, local, stand_in_folder) for model, backend in pool.items()}


def context_window(backend: Backend, local: LocalEngineConfig) -> int | None:
    """Tokens of prompt plus answer the model holds: declared, else the engine's max_model_len; None: unchecked."""
    if backend.kind == "local":
        return backend.context_window or local.max_model_len
    if backend.kind == "vllm":
        return backend.context_window or backend.engine_kwargs.get("max_model_len")
    return backend.context_window

