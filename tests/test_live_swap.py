"""Swapping the router live: the running app takes a new artifact through its config, as `serve deploy` applies
it (the controller's `apply_config`, which `serve deploy` reaches through the dashboard), while requests are
under way; none fails, and /v1/models and /v1/backends show the new pool.

The artifacts are small fits on the planted routing problem of conftest.py: one without the model "mid", and the
same with "mid" onboarded from a few labels (training/onboard.py). Every pool model is an `openai` backend on a
loopback upstream that answers with the model's name, so the test is bounded by the app, not by an engine."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer

import httpx
import pytest
from conftest import free_port
from test_cascade_serve import RecordedAnswers
from test_onboard import NEW, SMALL, labels_for, without

pytestmark = pytest.mark.slow

APP = "swap"
CLIENTS = 4
MAX_REQUESTS = 400  # bounds the load whatever happens
AFTER_SWAP = 40  # requests sent once the new pool shows, so some surely run on it
DEADLINE_S = 240


class ModelNames(dict):
    """Every (model, prompt) is answered with the model's name."""

    def get(self, key, default=None):
        return key[0]


class NamedAnswers(RecordedAnswers):
    """The cascade tests' OpenAI-compatible upstream, every model answering with its own name."""

    answers = ModelNames()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(the router without "mid", the same router with "mid" onboarded), saved."""
    from conftest import synthetic_routing_set

    from training.fit import fit_router
    from training.onboard import onboard

    data = synthetic_routing_set(rows=600)
    left_out = fit_router(without(data, NEW), SMALL, log=lambda message: None)
    labels, _ = labels_for(data, left_out, per_task=10)
    folder = tmp_path_factory.mktemp("swap")
    return left_out.save(folder / "before"), onboard(left_out, NEW, labels).save(folder / "after")


@pytest.fixture(scope="module")
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), NamedAnswers)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def deploy(port: int, args: dict, served_artifact=None) -> None:
    """Apply a serve.config-style config to the running Serve instance; `served_artifact` goes to the ingress's
    `user_config`, as an operator sets it in serve.config's `deployments:`."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    deployments = [{"name": "Embedder", "ray_actor_options": {"num_cpus": 0.2}}]
    if served_artifact is not None:
        deployments.append({"name": "RouterIngress", "user_config": {"artifact": str(served_artifact)}})
    config = {"http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve.app.builder:build_app", "args": args,
                                "deployments": deployments}]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def wait_for(check, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def pool(client) -> list[str]:
    return [card["id"] for card in client.get("/v1/models").json()["data"] if card["id"] != "router"]


@pytest.fixture(scope="module")
def app(ray_session, artifacts, upstream):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    backend = {"kind": "openai", "base_url": upstream, "timeout_s": 30, "max_retries": 0,
               "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}}
    # "mid" has its backend from the start: it joins the pool with the artifact that brings it.
    args = {"artifact": str(artifacts[0]), "backends": {model: backend for model in ("big", "small", NEW)}}
    try:
        deploy(port, args)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_for(lambda: client.get("/health").status_code == 200 and pool(client) == ["big", "small"], "the first pool")
            yield client, port, args
    finally:
        serve.shutdown()  # also when the deploy failed: the next module starts a Serve of its own


def ask(client, number: int) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "router", "preset": "quality", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": f"prompt {number} of kind 1 def f(): return 1"}]})


def swap_under_load(client, port: int, args: dict, artifact, expected_pool: list[str], ask=ask) -> list[httpx.Response]:
    """Deploy `artifact` while CLIENTS threads keep requests in flight (`ask(client, number)` sends request `number`);
    stop AFTER_SWAP requests after the new pool shows (at most MAX_REQUESTS, DEADLINE_S). Returns every response."""
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    swapped_at: list[int] = []
    started = time.monotonic()

    def load(worker: int) -> None:
        number = worker
        while time.monotonic() - started < DEADLINE_S:
            with lock:
                if len(responses) >= MAX_REQUESTS or (swapped_at and len(responses) >= swapped_at[0] + AFTER_SWAP):
                    return
            response = ask(client, number)
            number += CLIENTS
            with lock:
                responses.append(response)

    with ThreadPoolExecutor(CLIENTS) as workers:
        running = [workers.submit(load, worker) for worker in range(CLIENTS)]
        wait_for(lambda: len(responses) >= 10, "requests in flight before the swap")
        deploy(port, args, artifact)
        wait_for(lambda: pool(client) == expected_pool, "the new pool", timeout_s=DEADLINE_S)
        with lock:
            swapped_at.append(len(responses))
        for future in running:
            future.result()
    return responses


def test_an_onboarded_artifact_is_swapped_in_and_out_under_load_without_a_failed_request(app, artifacts):
    client, port, args = app
    refused = client.post("/v1/route", json={"prompt": "hi", "candidates": [NEW]})
    assert refused.status_code == 400 and "unknown candidates" in refused.json()["error"]["message"]

    for artifact, expected in ((artifacts[1], ["big", "small", NEW]), (artifacts[0], ["big", "small"])):
        responses = swap_under_load(client, port, args, artifact, expected)
        failed = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
        assert not failed, f"{len(failed)} of {len(responses)} requests failed during the swap: {failed[:3]}"
        assert len(responses) > AFTER_SWAP
        assert all(r.json()["model"] == r.json()["choices"][0]["message"]["content"] for r in responses)
        assert [b["model"] for b in client.get("/v1/backends").json()["data"]] == expected
        assert pool(client) == expected
        if NEW in expected:  # the onboarded model is routed to and answers
            routed = client.post("/v1/route", json={"prompt": "hi", "candidates": [NEW]})
            assert routed.status_code == 200 and routed.json()["model"] == NEW
            answered = client.post("/v1/chat/completions", json={"model": NEW, "messages": [{"role": "user", "content": "hi"}]})
            assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] == NEW
    assert client.post("/v1/chat/completions", json={"model": NEW, "messages": [{"role": "user", "content": "hi"}]}).status_code == 404
