"""The endpoint under abuse and faults: API keys, limits, fuzzing from its own OpenAPI schema, upstream failures of
every kind, a killed backend replica, cool-down, spend limits and a 1 MB adversarial prompt.

One app serves the module: a small synthetic artifact (pool `big`, `mid`, `small`) whose models are `openai`
backends. `big` and `mid` call a scripted upstream in this process that fails as a marker in the prompt says;
`small` points at a port where nothing listens. Its backends never cool down, so no test's failures change what
another test sees; the cool-down test runs an app of its own.
"""

import json
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import free_port, small_fit_config, synthetic_routing_set
from fakes import FakeUpstream, serving
from hypothesis import HealthCheck, given, settings, strategies
from serve_fixtures import deployed

from training.fit import fit_router

pytestmark = pytest.mark.slow

KEY, SPENDER_KEY = f"sk-test-{uuid.uuid4().hex}", f"sk-spender-{uuid.uuid4().hex}"
SECRET_PROMPT = f"confidential-{uuid.uuid4().hex}"
BACKEND_TIMEOUT_S = 2.0
REMOTE = {"kind": "openai", "timeout_s": BACKEND_TIMEOUT_S, "max_retries": 1, "retry_backoff_s": 0.05}
SPEND_LIMIT_USD = 0.5  # per key: the spend test's long prompts reach it in a few calls, the other tests' short ones never
NEVER_COOL = {"allowed_fails": 1000}
COOLDOWN = {"allowed_fails": 3, "window_s": 120, "cooldown_s": 2}
LIMITS = {"max_body_bytes": 2 * 2**20, "max_messages": 8, "max_tokens": 256, "max_n": 2}
FAULT = re.compile(r"fault=(\w+):(\w+)")


class ScriptedUpstream(FakeUpstream):
    """An OpenAI-compatible upstream. A prompt holding `fault=KIND:ID` makes the first model that sees ID fail
    every call for it in that way (so the router's retry on the same model fails too, and the next model, which
    answers normally, is what the client gets); `slow=SECONDS` delays the answer."""

    protocol_version = "HTTP/1.1"
    first_model: dict[str, str] = {}
    in_flight = 0
    lock = threading.Lock()

    def do_POST(self):
        body = self.read_json()
        prompt = body["messages"][-1]["content"]
        fault = FAULT.search(prompt)
        if fault:
            with self.lock:
                failing = self.first_model.setdefault(fault.group(2), body["model"]) == body["model"]
            if failing:
                return self._fail(fault.group(1), body)
        slow = re.search(r"slow=([\d.]+)", prompt)
        with self.lock:
            ScriptedUpstream.in_flight += 1
        try:
            if slow:
                time.sleep(float(slow.group(1)))
            self._answer(body, prompt)
        finally:
            with self.lock:
                ScriptedUpstream.in_flight -= 1

    def _fail(self, kind, body):
        if kind == "timeout":
            time.sleep(BACKEND_TIMEOUT_S * 2)
            return self.reply(200, {"choices": []})
        if kind == "drop":
            if body.get("stream"):
                self._start(200, "text/event-stream")
                self._send_chunk(self._chunk(body, "partial "))  # and never the chunked body's end
            else:
                self._start(200, "application/json", length=1000)
                self.wfile.write(b'{"id": "trunc')
                self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        status = int(kind)
        return self.reply(status, {"error": {"message": f"upstream {status} at http://10.9.8.7:1234/internal, key sk-upstream",
                                              "type": "invalid_request_error" if status == 400 else "server_error"}})

    def _answer(self, body, prompt):
        text = f"{body['model']} says: {prompt[:40]}"
        if not body.get("stream"):
            return self.reply(200, self.completion(body["model"], text))
        self._start(200, "text/event-stream")
        for piece in (text[:10], text[10:]):
            self._send_chunk(self._chunk(body, piece))
        self._send_chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _send_chunk(self, text):
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    @staticmethod
    def _chunk(body, piece):
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        return f"data: {json.dumps(chunk)}\n\n"

    def _start(self, status, content_type, length=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()



@pytest.fixture(scope="module")
def upstream():
    with serving(ScriptedUpstream) as url:
        yield url


def pool_backends(upstream: str, refused_port: int) -> dict:
    """`big` and `mid` on the scripted upstream, `small` on a port where nothing listens (yet)."""
    return {"big": {**REMOTE, "base_url": upstream}, "mid": {**REMOTE, "base_url": upstream, "context_window": 4096},
            "small": {**REMOTE, "base_url": f"http://127.0.0.1:{refused_port}/v1"}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return fit_router(synthetic_routing_set(), small_fit_config(), log=lambda message: None).save(tmp_path_factory.mktemp("hardening") / "router")


@pytest.fixture(scope="module")
def base_url(ray_session, tmp_path_factory, artifact, upstream):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"{KEY}\n{SPENDER_KEY}\n")
    config = {
        "artifact": str(artifact),
        "backends": pool_backends(upstream, free_port()),
        "access": {"api_keys_file": str(keys), "spend_limit_usd": SPEND_LIMIT_USD, "spend_period_s": 86400},
        "limits": LIMITS,
        "cooldown": NEVER_COOL,
    }
    with deployed(config, "hardened") as url:
        yield url


@pytest.fixture(scope="module")
def api(base_url):
    with httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def ask(api, prompt, stream=False, **fields):
    return api.post("/v1/chat/completions", json={"model": "router", "messages": [{"role": "user", "content": prompt}],
                                                  "max_tokens": 8, "stream": stream, **fields})


def assert_openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert param is None or error["param"] == param
    assert code is None or error["code"] == code
    assert "Traceback" not in error["message"]
    return error


def backend_states(api) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in api.get("/v1/backends").json()["data"]}


def wait_for(condition, what, limit_s=60):
    """Poll until `condition()` holds (bounded, so a broken app fails the test instead of hanging it)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {limit_s} s")
        time.sleep(0.2)


def first_two(api, prompt):
    """The order in which the router would try `big` and `mid` for this prompt."""
    response = api.post("/v1/route", json={"prompt": prompt, "candidates": ["big", "mid"], "preset": "quality"})
    assert response.status_code == 200, response.text
    return [entry["model"] for entry in response.json()["ranking"] if entry["eligible"]]


# --- access ----------------------------------------------------------------------------------------------------


def test_api_keys_are_required_except_for_health(base_url, api):
    with httpx.Client(base_url=base_url, timeout=60) as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}
        assert_openai_error(anonymous.post("/v1/route", json={"prompt": "hi"}), 401, code="invalid_api_key")
        wrong = anonymous.post("/v1/route", json={"prompt": "hi"}, headers={"Authorization": "Bearer sk-wrong"})
        assert_openai_error(wrong, 401, code="invalid_api_key")
        assert_openai_error(anonymous.get("/v1/models", headers={"Authorization": KEY}), 401)  # no Bearer scheme
    assert api.post("/v1/route", json={"prompt": "hi"}).status_code == 200


def test_request_ids_are_echoed_or_made(api):
    assert api.get("/v1/models", headers={"x-request-id": "my-id-1"}).headers["x-request-id"] == "my-id-1"
    assert api.get("/v1/models").headers["x-request-id"]


def test_spend_limit_answers_429_once_spent(base_url, api):
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {SPENDER_KEY}"}) as spender:
        statuses = []
        long_prompt = "word " * 150_000  # `big` costs 1e-6 USD a prompt token on the synthetic prices
        for _ in range(20):
            response = spender.post("/v1/chat/completions", json={"model": "big", "messages": [{"role": "user", "content": long_prompt}]})
            statuses.append(response.status_code)
            if response.status_code != 200:
                break
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        assert_openai_error(response, 429, code="insufficient_quota")
        assert int(response.headers["retry-after"]) > 0
    assert ask(api, "hi").status_code == 200  # other keys keep their own budget


# --- limits and malformed input ---------------------------------------------------------------------------------


QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "router", "messages": [', 400, None),
    ({"model": "router"}, 400, "messages"),
    ({"model": "router", "messages": []}, 400, "messages"),
    ({"model": "router", "messages": [{"role": "user", "content": 42}]}, 400, "messages"),
    ({"model": "router", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages"),
    ({"model": "gpt-17", "messages": QUESTION}, 404, "model"),
    ({"model": "router", "messages": QUESTION, "preset": "fastest"}, 400, "preset"),
    ({"model": "router", "messages": QUESTION, "cost_weight": -1}, 400, "cost_weight"),
    ({"model": "router", "messages": QUESTION, "candidates": ["nope"]}, 400, "candidates"),
    ({"model": "router", "messages": QUESTION, "n": LIMITS["max_n"] + 1}, 400, "n"),
    ({"model": "router", "messages": QUESTION, "max_tokens": LIMITS["max_tokens"] + 1}, 400, "max_tokens"),
    ({"model": "router", "messages": QUESTION * (LIMITS["max_messages"] + 1)}, 400, "messages"),
    ({"model": "router", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "router", "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}]},
     400, "tools"),
    ({"model": "router", "messages": QUESTION, "response_format": {"type": "json_schema"}}, 400, "response_format"),
], ids=["malformed-json", "no-messages", "empty-messages", "number-content", "number-text-part", "unknown-model", "bad-preset",
        "negative-cost-weight", "unknown-candidate", "n-over-cap", "max-tokens-over-cap", "too-many-messages", "zero-max-tokens",
        "malformed-tools", "schema-less-response-format"])
def test_bad_requests_get_openai_errors_naming_the_field(api, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = api.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, status, param=param)


def test_a_body_over_the_limit_gets_413_and_the_app_keeps_answering(api):
    huge = "x" * (LIMITS["max_body_bytes"] + 1)
    assert_openai_error(ask(api, huge), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while the body is read
        body = json.dumps({"model": "router", "messages": [{"role": "user", "content": huge}]}).encode()
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    assert_openai_error(api.post("/v1/route", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert ask(api, "What is 2 + 2?").status_code == 200


def test_route_takes_the_chat_body_and_ignores_generation_fields(api):
    chat_body = {"model": "router", "messages": QUESTION, "temperature": 0.2, "stream": True, "max_tokens": 8, "preset": "cheap"}
    response = api.post("/v1/route", json=chat_body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] in {"big", "mid", "small"}
    assert_openai_error(api.post("/v1/route", json={**chat_body, "model": "big"}), 400, param="model")


def test_a_model_whose_context_window_cannot_hold_the_request_is_not_eligible(api):
    response = api.post("/v1/route", json={"prompt": "hello", "max_tokens": 250, "candidates": ["mid", "big"]})
    assert response.status_code == 200
    long_prompt = "word " * 4000  # about 4000 tokens: with 250 more, over mid's 4096
    ranking = api.post("/v1/route", json={"prompt": long_prompt, "max_tokens": 250}).json()["ranking"]
    mid = next(entry for entry in ranking if entry["model"] == "mid")
    assert not mid["eligible"] and "context window of 4096 tokens" in mid["ineligible_because"]
    refused = api.post("/v1/route", json={"prompt": long_prompt, "max_tokens": 250, "candidates": ["mid"]})
    assert_openai_error(refused, 400, code="context_length_exceeded")


def test_a_1mb_adversarial_prompt_does_not_hold_up_a_normal_request(api):
    """A normal request is answered while a 1 MB one is still in progress: the big body's second half is held back
    until the normal answer is in, so the normal request is answered during the big one or not at all."""
    normal = {"prompt": "Write a haiku about autumn leaves.", "preset": "balanced"}
    expected = api.post("/v1/route", json=normal)
    body = json.dumps({"prompt": "a(" * 500_000, "preset": "balanced"}).encode()
    first_half_sent, normal_answered = threading.Event(), threading.Event()

    def held_back():
        yield body[: len(body) // 2]
        first_half_sent.set()
        normal_answered.wait(timeout=60)  # bounded: if the normal request is held up, the big one still ends
        yield body[len(body) // 2:]

    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(api.post, "/v1/route", content=held_back(), headers={"Content-Type": "application/json"})
        assert first_half_sent.wait(timeout=60)
        answer = api.post("/v1/route", json=normal)
        big_in_progress = not big.done()
        normal_answered.set()
        big = big.result()
    assert big_in_progress and answer.status_code == 200 and answer.json()["ranking"] == expected.json()["ranking"]
    assert big.status_code == 200 and big.json()["prompt_tokens"] > 500_000


# --- fuzzing from the served OpenAPI schema ---------------------------------------------------------------------


FUZZ_EXAMPLES = 50  # per route (a route without parameters has one)


def steer_past_validation(body: dict, prompt: str) -> None:
    """Give a generated body the fields that random values rarely get right (`model: router` and one user
    message), keeping its other fields (routing controls, caps, unknown parameters), so that fuzzing also
    reaches the routing and the backends."""
    body["model"] = "router"
    body.pop("prompt", None)
    body["messages"] = [{"role": "user", "content": prompt}]


def test_fuzzed_requests_never_get_a_server_error(base_url):
    """Requests that schemathesis derives from the served OpenAPI schema, FUZZ_EXAMPLES per route (hypothesis
    driven directly: schemathesis' pytest plugin does not load under this pytest)."""
    served = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    operations = [result.ok() for result in served.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/v1/route", "/v1/chat/completions", "/v1/backends"}

    for operation in operations:
        @given(case=operation.as_strategy(), steer=strategies.booleans(), prompt=strategies.text(min_size=1, max_size=200))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def answered_without_a_server_error(case, steer, prompt):
            if steer and isinstance(case.body, dict):
                steer_past_validation(case.body, prompt)
            response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                # `small` is down on purpose: a request that only it may answer gets the deliberate 503
                assert response.status_code < 500 or error["code"] == "backends_unavailable", response.text

        answered_without_a_server_error()


def test_a_normal_request_succeeds_after_the_abuse(api):
    response = ask(api, "What is 2 + 2?")
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


# --- upstream faults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, reason", [("500", "HTTP 500"), ("401", "HTTP 401"), ("404", "HTTP 404"), ("503", "HTTP 503"),
                                          ("timeout", "no answer within"), ("drop", "connection dropped")])
def test_an_upstream_failure_hands_the_request_to_the_next_model(api, kind, reason):
    prompt = f"Tell me a fact. fault={kind}:{uuid.uuid4().hex}"
    first, second = first_two(api, prompt)
    response = ask(api, prompt, candidates=["big", "mid"], preset="quality")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == second and body["choices"][0]["message"]["content"].startswith(f"{second} says")
    (fallback,) = body["routing"]["fallbacks"]
    assert fallback["model"] == first and fallback["reason"].startswith(reason)
    assert "10.9.8.7" not in response.text and "sk-upstream" not in response.text  # upstream text stays in the log


def test_an_upstream_refusal_of_the_request_comes_back_as_400(api):
    error = assert_openai_error(ask(api, f"fault=400:{uuid.uuid4().hex}", candidates=["big", "mid"]), 400)
    assert "refused the request" in error["message"] and "10.9.8.7" not in error["message"]


def test_a_stream_dropped_midway_ends_with_an_error_event(api):
    prompt = f"Stream me. fault=drop:{uuid.uuid4().hex}"
    first, _ = first_two(api, prompt)
    response = ask(api, prompt, stream=True, candidates=["big", "mid"], preset="quality")
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["model"] == first and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] == f"{first} failed mid-stream: connection dropped"


@pytest.fixture
def cooling_api(base_url, artifact, upstream):
    """An app of the cool-down test's own (under /cooling), whose backends cool down after COOLDOWN["allowed_fails"]
    failures: no other test's requests count toward its cool-down state. Yields a client and the port `small`'s
    backend points at."""
    from ray import serve

    from serve.app.builder import build_app

    refused_port = free_port()
    config = {"artifact": str(artifact), "backends": pool_backends(upstream, refused_port), "cooldown": COOLDOWN}
    serve.run(build_app(config), name="cooling", route_prefix="/cooling")
    try:
        with httpx.Client(base_url=f"{base_url}/cooling", timeout=120) as client:
            yield client, refused_port
    finally:
        serve.delete("cooling")


def test_a_refused_backend_cools_down_and_recovers(cooling_api):
    api, refused_port = cooling_api
    cheap_first = {"candidates": ["small", "mid"], "cost_weight": 10}  # the price term puts `small` first
    for attempt in range(COOLDOWN["allowed_fails"] + 1):
        if backend_states(api)["small"] == "cooling_down":
            break
        body = ask(api, "hello", **cheap_first).json()
        assert body["model"] == "mid" and body["routing"]["fallbacks"] == [{"model": "small", "reason": "unreachable"}]
    assert attempt >= 1 and backend_states(api)["small"] == "cooling_down"
    skipped = ask(api, "hello", **cheap_first).json()
    assert skipped["model"] == "mid" and skipped["routing"]["fallbacks"][0]["reason"].startswith("cooling down")
    named = api.post("/v1/chat/completions", json={"model": "small", "messages": QUESTION})
    assert_openai_error(named, 503, code="backends_unavailable")
    assert int(named.headers["retry-after"]) >= 1

    with serving(ScriptedUpstream, refused_port):  # the backend comes back
        wait_for(lambda: backend_states(api)["small"] == "probing", "the cool-down ending")
        probe = ask(api, "hello", **cheap_first).json()
        assert probe["model"] == "small" and probe["routing"]["fallbacks"] == []
        assert backend_states(api)["small"] == "available"


def test_a_backend_replica_killed_mid_request_loses_no_request(api):
    import ray

    prompt = "Take your time. slow=1.5"
    first, second = first_two(api, prompt)
    with ThreadPoolExecutor(6) as pool:
        requests = [pool.submit(ask, api, prompt, candidates=["big", "mid"], preset="quality") for _ in range(6)]
        wait_for(lambda: ScriptedUpstream.in_flight >= 3, "requests reaching the upstream", limit_s=30)
        (replica,) = [actor for actor in ray.util.list_named_actors(all_namespaces=True) if f"OpenAI:{first}#" in actor["name"]]
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        responses = [request.result() for request in requests]
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.json()["model"] in {first, second}
    assert any(response.json()["model"] == second for response in responses)  # those in flight on the dead replica
    restarted = lambda: api.post("/v1/chat/completions", json={"model": first, "messages": QUESTION}).status_code == 200
    wait_for(restarted, f"a new {first} replica answering", limit_s=90)


def test_keys_and_prompts_never_reach_the_logs(api):
    assert ask(api, SECRET_PROMPT).status_code == 200
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    files = [path for path in logs.rglob("*") if path.is_file()]
    assert any("serve" in str(path) for path in files)
    for path in files:
        text = path.read_bytes()
        for secret in (KEY, SPENDER_KEY, SECRET_PROMPT):
            assert secret.encode() not in text, f"{secret[:12]}... found in {path}"
