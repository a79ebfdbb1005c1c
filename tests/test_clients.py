"""The clients people put in front of a router, and what they need of it: the capability rule and the request checks
without Ray; `serve run` failing fast; then the real clients (the `openai` SDK, LiteLLM's SDK and proxy,
LangChain's ChatOpenAI) against one deployed app, each running its snippet from docs/clients.md.

The deployed app serves every pool model with the stand-in engine given vLLM's tool parser and a template that
shows the tools (tests/data/smollm2_tools.jinja); half of the pool declares `tools: false`, so that a tool-using
request is routed among the other half, as it would be in a pool that mixes models with and without tool calls.
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import yaml
from conftest import free_port
from pydantic import ValidationError
from serve_fixtures import REPO, TOOL_CALLING_ENGINE, deployed, router_artifact

from serve.app.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    text_completion,
)
from serve.backends.backend_config import (
    LocalBackend,
    LocalEngineConfig,
    OpenAIBackend,
    VLLMBackend,
)
from serve.backends.capabilities import pool_capabilities
from serve.core.capabilities import (
    Capabilities,
    Needs,
    Shortfall,
    needs_of,
    shortfall,
    shortfalls,
)
from serve.errors import invalid_request

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM reads its price map from its package
DOCS = REPO / "docs" / "clients.md"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


# --- the capability rule, without Ray ----------------------------------------------------------------------------

@pytest.mark.parametrize("fields, feature, field", [
    ({"tools": [WEATHER]}, "tools", "tools"),
    ({"functions": [WEATHER["function"]]}, "tools", "functions"),
    ({"tool_choice": "required"}, "tools", "tool_choice"),
    ({"function_call": "auto"}, "tools", "function_call"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, "json_schema",
     "response_format"),
    ({"messages": [QUESTION[0], {"role": "user", "content": [{"type": "text", "text": "and this?"}, IMAGE]}]}, "image_input",
     "messages[1].content[1]"),
])
def test_every_field_that_implies_a_need_is_read(fields, feature, field):
    needs = needs_of({"messages": QUESTION, **fields}, output_tokens=7)
    assert getattr(needs, feature) == field and needs.features() == [field] and needs.output_tokens == 7


@pytest.mark.parametrize("fields", [{"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "json_object"}},
                                    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}])
def test_a_plain_request_needs_nothing(fields):
    assert needs_of({"messages": QUESTION, **fields}).features() == []


def test_a_backend_without_declarations_is_not_checked():
    everything = Needs(tools="tools", json_schema="response_format", image_input="messages[0].content[0]", output_tokens=10**6)
    assert shortfall(Capabilities(), everything) is None


def test_a_model_that_lacks_a_need_is_left_out_naming_the_field():
    capable, toolless = Capabilities(context_window=100, tools=True), Capabilities(context_window=100, tools=False)
    needs = Needs(tools="tool_choice", output_tokens=50).with_prompt_tokens(40)
    assert shortfalls([capable, toolless], needs) == [None, Shortfall("tool_choice", "no tool calls (asked for by tool_choice)")]
    too_long = shortfall(capable, needs.with_prompt_tokens(60))
    assert too_long.field == "messages" and too_long.reason == "context window of 100 tokens < 60 prompt + 50 answer tokens"
    nobody = shortfalls([toolless, Capabilities(image_input=False)], Needs(tools="tools", image_input="messages[0].content[1]"))
    assert [reason.field for reason in nobody] == ["tools", "messages[0].content[1]"]


def test_each_kind_of_backend_has_its_default_capabilities():
    backends = {
        "remote": OpenAIBackend(kind="openai", base_url="http://127.0.0.1:9/v1", capabilities={"tools": True}),
        "engine": VLLMBackend(kind="vllm", model_source="org/model",
                              engine_kwargs={"max_model_len": 4096, "enable_auto_tool_choice": True, "tool_call_parser": "hermes"}),
        "strict": LocalBackend(capabilities={"json_schema": False}),
    }
    pool = pool_capabilities(["stand-in", "remote", "engine", "strict"], backends, LocalEngineConfig())
    # SmolLM2's own template never shows the model tools, and its engine has no tool parser: no tool calls.
    assert pool["stand-in"] == Capabilities(context_window=2048, tools=False, json_schema=True, image_input=False)
    assert pool["remote"] == Capabilities(tools=True)  # declared; the rest is not checked
    assert pool["engine"] == Capabilities(context_window=4096, tools=True, json_schema=True)
    assert pool["strict"].json_schema is False
    assert pool_capabilities(["m"], {}, LocalEngineConfig(**TOOL_CALLING_ENGINE))["m"].tools
    parser_only = {key: TOOL_CALLING_ENGINE["engine_kwargs"][key] for key in ("enable_auto_tool_choice", "tool_call_parser")}
    assert not pool_capabilities(["m"], {}, LocalEngineConfig(engine_kwargs=parser_only))["m"].tools  # template shows none
    with pytest.raises(ValueError, match="backends.m.capabilities.tools: true, but its engine has no tool parser"):
        pool_capabilities(["m"], {"m": LocalBackend(capabilities={"tools": True})}, LocalEngineConfig())


@pytest.mark.parametrize("fields", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
    {"tools": [{"type": "function"}]},
    {"tools": [{"type": "function", "function": {"name": "has spaces"}}]},
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
], ids=["not-a-json-schema", "no-function", "bad-name", "no-json-schema", "bad-json-schema"])
def test_malformed_tools_and_formats_are_refused_naming_the_field(fields):
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"model": "router", "messages": QUESTION, **fields})
    assert invalid_request(refused.value).param == next(iter(fields))


def test_a_legacy_completion_is_a_chat_of_one_user_message():
    request = CompletionRequest.model_validate({"model": "router", "prompt": ["Say hi."], "max_tokens": 5, "preset": "cheap"})
    chat = request.as_chat()
    assert chat.preset == "cheap" and chat.backend_body() == {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5}
    with pytest.raises(APIError) as refused:
        CompletionRequest(model="router", prompt="x", echo=True).as_chat()
    assert refused.value.param == "echo"
    with pytest.raises(ValidationError):
        CompletionRequest(model="router", prompt=["a", "b"])
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    assert text_completion(chunk) == {"id": "c", "object": "text_completion",
                                      "choices": [{"index": 0, "text": "hi", "finish_reason": None, "logprobs": None}]}


# --- start-up ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_run_with_a_missing_artifact_exits_with_the_message(tmp_path):
    """Not Serve's endless wait on a build that fails every retry: the command exits non-zero within a minute."""
    config = yaml.safe_load((REPO / "serve.config").read_text())
    config["http_options"]["port"] = free_port()
    config["applications"][0]["args"]["artifact"] = str(tmp_path / "missing")
    (tmp_path / "serve.config").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "RAY_ADDRESS": "local"}
    serve_command = os.path.join(os.path.dirname(sys.executable), "serve")
    finished = subprocess.run([serve_command, "run", str(tmp_path / "serve.config")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output[-3000:]
    assert f"no router artifact at {tmp_path / 'missing'}" in output and "python -m training fit" in output


# --- the real clients against the deployed app -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(shared_data, tmp_path_factory):
    """(artifact, the models that call tools, the models that declare they cannot)."""
    from serve.core.artifact import RouterArtifact

    artifact = router_artifact(tmp_path_factory.mktemp("artifact"))
    models = RouterArtifact.load(artifact).models
    return artifact, models[1::2], models[::2]


@pytest.fixture(scope="module")
def base_url(ray_session, pool):
    artifact, _, toolless = pool
    backends = {model: {"kind": "local", "capabilities": {"tools": False}} for model in toolless}
    with deployed({"artifact": str(artifact), "local": TOOL_CALLING_ENGINE, "backends": backends}, "clients") as url:
        yield url


@pytest.fixture(scope="module")
def api(base_url):
    with httpx.Client(base_url=base_url, timeout=300) as client:
        yield client


def run_snippet(name: str, namespace: dict, **urls: str) -> dict:
    """Run the docs' snippet `name` (a ```python block opening with `# snippet: name`) in `namespace`, with the docs'
    URLs replaced by the test's (keyword: the docs' port, e.g. `port_8000="http://127.0.0.1:51234"`)."""
    blocks = dict((found, code) for code, found in re.findall(r"```python\n(# snippet: (\S+)\n.*?)```", DOCS.read_text(), re.S))
    code = blocks[name]
    for docs_port, url in urls.items():
        code = code.replace(f"http://127.0.0.1:{docs_port.removeprefix('port_')}", url)
    exec(compile(code, f"{DOCS}:{name}", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_ready_once_every_engine_answers(api):
    assert api.get("/health/ready").json() == {"status": "ready", "engines": ["local"]}


@pytest.mark.slow
def test_the_openai_snippets(base_url, pool):
    _, with_tools, toolless = pool
    snippet = run_snippet("openai-tools", run_snippet("openai", {}, port_8000=base_url), port_8000=base_url)
    assert snippet["reply"].model in with_tools + toolless and snippet["reply"].choices[0].message.content.strip()
    assert snippet["streamed"].strip() and snippet["legacy"].object == "text_completion"
    called = snippet["called"]  # whether SmolLM2 makes the call is the model's business; where it goes is the router's
    assert called.model in with_tools and called.choices[0].finish_reason
    ranking = called.model_extra["routing"]["decision"]["ranking"]
    assert {entry["model"]: entry["ineligible_because"] for entry in ranking if not entry["eligible"]} == {
        model: "no tool calls (asked for by tools)" for model in toolless}


@pytest.mark.slow
def test_route_leaves_out_the_models_a_request_cannot_use(api, pool):
    _, with_tools, _ = pool
    routed = api.post("/v1/route", json={"messages": QUESTION, "tools": [WEATHER]})
    assert routed.status_code == 200, routed.text
    assert {entry["model"] for entry in routed.json()["ranking"] if entry["eligible"]} == set(with_tools)


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error


@pytest.mark.slow
def test_a_request_no_model_can_serve_gets_a_400_naming_the_field(api, pool):
    _, with_tools, toolless = pool
    image = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE]}]
    error = assert_openai_error(api.post("/v1/chat/completions", json={"model": "router", "messages": image}), 400,
                                "messages[0].content[1]")
    assert all(f"{model}: no image input" in error["message"] for model in with_tools + toolless)
    only_toolless = {"model": "router", "messages": QUESTION, "tools": [WEATHER], "candidates": toolless}
    error = assert_openai_error(api.post("/v1/chat/completions", json=only_toolless), 400, "tools")
    assert error["code"] == "unsupported_capability" and all(model in error["message"] for model in toolless)
    named = {"model": toolless[0], "messages": QUESTION, "tools": [WEATHER]}
    assert_openai_error(api.post("/v1/chat/completions", json=named), 400, "tools")
    malformed = {"model": "router", "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}
    assert_openai_error(api.post("/v1/chat/completions", json=malformed), 400, "tools")


@pytest.mark.slow
def test_every_path_answers_in_the_openai_error_shape(api):
    assert "chat completions" in assert_openai_error(api.post("/v1/embeddings", json={"model": "router", "input": "hi"}), 404)["message"]
    assert "/v1/chat/completions" in assert_openai_error(api.get("/v1/nothing-here"), 404)["message"]
    assert_openai_error(api.get("/v1/chat/completions"), 405)
    assert_openai_error(api.post("/v1/completions", json={"model": "router", "prompt": ["a", "b"]}), 400, "prompt")
    streamed = api.post("/v1/completions", json={"model": "router", "prompt": "Say hi.", "max_tokens": 4, "stream": True})
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "text_completion"


@pytest.mark.slow
def test_the_litellm_sdk_snippet(base_url):
    snippet = run_snippet("litellm", {}, port_8000=base_url)
    assert snippet["answer"].choices[0].message.content.strip() and snippet["streamed"].strip()


@pytest.fixture
def litellm_proxy(base_url, tmp_path, monkeypatch):
    """LiteLLM's proxy with the router as its one deployment (the docs' config), on a free port."""
    monkeypatch.setenv("LITELLM_MASTER_KEY", f"sk-{uuid.uuid4().hex}")
    config = re.search(r"```yaml\n(# litellm-config.yaml.*?)```", DOCS.read_text(), re.S).group(1)
    (tmp_path / "litellm-config.yaml").write_text(config.replace("http://127.0.0.1:8000", base_url))
    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "litellm"), "--config", str(tmp_path / "litellm-config.yaml"),
               "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "proxy.log", "w") as log:
        proxy = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"http://127.0.0.1:{port}/health/liveliness"):
            if proxy.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the LiteLLM proxy did not start: {(tmp_path / 'proxy.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_the_litellm_proxy_snippet(litellm_proxy):
    snippet = run_snippet("litellm-proxy", {}, port_4000=litellm_proxy)
    assert snippet["through_proxy"].choices[0].message.content.strip()


@pytest.mark.slow
def test_the_langchain_snippet(base_url, pool):
    _, with_tools, _ = pool
    snippet = run_snippet("langchain", {"__name__": "docs_langchain"}, port_8000=base_url)
    assert isinstance(snippet["by_schema"], snippet["City"])  # vLLM's structured output holds the stand-in to the schema
    assert snippet["streamed"].strip() and len(snippet["answers"]) == 2
    # Function calling and bound tools go to the models that declare tool calls, whose engine holds the arguments
    # to the tool's schema (tool_strict_level: parameter); what SmolLM2 puts in them is its own.
    assert snippet["by_function"]["raw"].response_metadata["model_name"] in with_tools
    assert isinstance(snippet["by_function"]["parsed"], snippet["City"])
    assert snippet["tool_reply"].response_metadata["model_name"] in with_tools
    assert [call["name"] for call in snippet["tool_reply"].tool_calls] == ["get_weather"]


def test_the_batch_job_routes_only_among_the_models_that_can_serve_its_needs(pool, tmp_path, capsys):
    from serve.batch.cli import _allowed, main
    from serve.core.artifact import RouterArtifact

    artifact, with_tools, toolless = pool
    config = {"local": TOOL_CALLING_ENGINE, "backends": {model: {"kind": "local", "capabilities": {"tools": False}} for model in toolless}}
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(config))
    allowed = _allowed(RouterArtifact.load(artifact), None, ["tools"], str(tmp_path / "pool.yaml"))
    assert [model for model, ok in zip(RouterArtifact.load(artifact).models, allowed) if ok] == with_tools
    arguments = ["--artifact", str(artifact), "--input", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "out"),
                 "--needs", "tools", "--pool-config", str(REPO / "serve.config")]
    assert main(arguments) == 2  # the shipped pool declares no tool calls: refused before any work
    assert "--needs tools: no candidate can serve it" in capsys.readouterr().err
