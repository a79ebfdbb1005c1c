"""What a pool model can take and what a request needs of it: the one check that leaves a model out of a request's
candidates. The Ranker applies it to chat completions, /v1/route and cascades, the batch job to its prompts, and the
ingress to a request that names a pool model.

A capability a backend does not declare (None) is not checked, as a context window that is not known is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

FEATURES = ("tools", "json_schema", "image_input")  # the capabilities a request's body can ask for
FEATURE_NAMES = {"tools": "tool calls", "json_schema": "structured output (JSON schema)", "image_input": "image input"}
IMAGE_PARTS = ("image_url", "input_image", "image")  # content part types that carry an image


@dataclass(frozen=True)
class Capabilities:
    """What one pool model can take; None: not declared, so not checked."""

    context_window: int | None = None  # tokens of prompt plus answer
    tools: bool | None = None
    json_schema: bool | None = None
    image_input: bool | None = None


@dataclass(frozen=True)
class Needs:
    """What a request needs of the model that answers it: for each feature, the field of the body that asks for it
    (None: not needed); and its size, prompt tokens (counted by the Embedder) plus the answer's cap."""

    tools: str | None = None
    json_schema: str | None = None
    image_input: str | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0

    def with_prompt_tokens(self, prompt_tokens: int) -> Needs:
        return replace(self, prompt_tokens=int(prompt_tokens))

    def features(self) -> list[str]:
        """The fields of the body that ask for a feature."""
        return [getattr(self, feature) for feature in FEATURES if getattr(self, feature) is not None]


@dataclass(frozen=True)
class Shortfall:
    """Why a model cannot serve a request: the request field that asks for what the model lacks, and what it lacks."""

    field: str
    reason: str


def shortfall(capabilities: Capabilities, needs: Needs) -> Shortfall | None:
    """What keeps a model with `capabilities` from serving a request with `needs`; None when nothing does."""
    for feature in FEATURES:
        field = getattr(needs, feature)
        if field is not None and getattr(capabilities, feature) is False:
            return Shortfall(field, f"no {FEATURE_NAMES[feature]} (asked for by {field})")
    window = capabilities.context_window
    if window is not None and needs.prompt_tokens + needs.output_tokens > window:
        return Shortfall("messages", f"context window of {window} tokens < {needs.prompt_tokens} prompt"
                                     f" + {needs.output_tokens} answer tokens")
    return None


def shortfalls(pool: Sequence[Capabilities], needs: Needs) -> list[Shortfall | None]:
    """`shortfall` of each model of the pool, in the pool's order."""
    return [shortfall(capabilities, needs) for capabilities in pool]


def needs_of(body: Mapping[str, Any], output_tokens: int = 0) -> Needs:
    """The needs that an OpenAI chat request's body implies: tool calls (`tools`, `functions`, a `tool_choice` or
    `function_call` other than none), structured output (`response_format` of type json_schema), image input (an
    image part in a message's content)."""
    tools = next((name for name in ("tools", "functions") if body.get(name)), None)
    if tools is None:
        tools = next((name for name in ("tool_choice", "function_call") if body.get(name) not in (None, "none")), None)
    response_format = body.get("response_format")
    json_schema = "response_format" if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema" else None
    return Needs(tools=tools, json_schema=json_schema, image_input=_image_part(body.get("messages") or []),
                 output_tokens=output_tokens)


def _image_part(messages: Sequence[Any]) -> str | None:
    """The field of the first image part among the messages' contents, e.g. `messages[1].content[0]`."""
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                if isinstance(part, Mapping) and part.get("type") in IMAGE_PARTS:
                    return f"messages[{index}].content[{part_index}]"
    return None
