"""Route your own pool, end to end, as docs/own_pool.md tells a platform engineer: a prompt log is labelled by the
pool (`python -m training label`) and fitted (`python -m training fit`), the real Serve app serves the router, a
new model is labelled on prompts stratified over the fitted router's latent tasks (`label --artifact`) and
onboarded (`python -m training onboard`), and the app swaps to the onboarded router while requests are in flight,
among them a cascade whose first step is decided before the swap and the next after.

The pool models and the new one are replayed from RouterBench's recorded answers by the labelling tests'
loopback upstream, which answers the app's backends too. Bounded: 240 prompts, loopback only."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import httpx
import numpy as np
import pytest
from conftest import free_port
from fakes import serving
from test_labelling import (
    POOL,
    Replay,
    labelled,
    recorded_prompts,
    replay_pool,
    run_label,
)
from test_live_swap import APP, deploy, pool, swap_under_load, wait_for

pytestmark = pytest.mark.slow

NEW = "gpt-4-1106-preview"  # onboarded into the router fitted on the others
FIRST_POOL = [model for model in POOL if model != NEW]
LOG_PROMPTS, POOL_BUDGET = 240, 200
NEW_BUDGET, FLOOR = 60, 8
HOLD_S = 120  # the longest a held answer waits for the swap


class HeldReplay(Replay):
    """The replay upstream; the calls for the `held` prompt wait until `release` is set (the models asked are
    recorded in `held_calls`)."""

    answers: ClassVar[dict[tuple[str, str], str]] = {}
    calls: ClassVar[dict[str, int]] = {}
    held: ClassVar[str | None] = None
    held_calls: ClassVar[list[str]] = []
    arrived: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def read_json(self) -> dict:
        body = super().read_json()
        if body["messages"][-1]["content"] == self.held:
            self.held_calls.append(body["model"])
            self.arrived.set()
            self.release.wait(HOLD_S)
        return body


@pytest.fixture(scope="module")
def log(shared_data):
    """The prompt log (prompt, reference, benchmark) with every model's recorded answer."""
    return recorded_prompts(LOG_PROMPTS, seed=1)


@pytest.fixture(scope="module")
def upstream(log):
    HeldReplay.held, HeldReplay.held_calls = None, []
    HeldReplay.arrived.clear()
    HeldReplay.release.clear()
    HeldReplay.answers = {(model, prompt): answer for model in POOL for prompt, answer in zip(log["prompt"], log[model])}
    with serving(HeldReplay) as root:
        yield root


def chat(client, prompt: str, **fields) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "router", "max_tokens": 4, **fields,
                                                     "messages": [{"role": "user", "content": prompt}]})


def asked(response: httpx.Response) -> str:
    return json.loads(response.request.content)["messages"][-1]["content"]


def test_label_fit_serve_onboard_and_swap_live(tmp_path, capsys, ray_session, log, upstream):
    from ray import serve

    from serve.app.serving import NO_ESTIMATOR
    from serve.core.artifact import RouterArtifact
    from training.__main__ import main
    from training.embed import embed_texts
    from training.labelling.sampling import latent_tasks, task_quotas

    prompts = log["prompt"].tolist()
    log[["prompt", "reference", "benchmark"]].to_parquet(tmp_path / "log.parquet")
    for folder in ("pool", "new"):
        (tmp_path / folder).mkdir()

    # 1. Label the log with the pool, fit on the labels.
    code, _, err = run_label(capsys, "--prompts", tmp_path / "log.parquet", "--pool", replay_pool(tmp_path / "pool", upstream, models=FIRST_POOL),
                             "--out", tmp_path / "labels", "--budget", POOL_BUDGET)
    assert code == 0, err
    table = labelled(tmp_path / "labels")
    assert table.models == FIRST_POOL and len(table) == POOL_BUDGET
    assert main(["fit", "--dataset", str(tmp_path / "labels" / "labels.jsonl"), "--out", str(tmp_path / "router"), "--trainer", "local"]) == 0
    router = RouterArtifact.load(tmp_path / "router")
    assert router.models == FIRST_POOL and router.posthoc is not None  # the labels keep the answers: cascades judge them

    # 2. Serve it; the new model's backend is declared ahead of the artifact that brings it.
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    backend = {"kind": "openai", "base_url": upstream, "timeout_s": HOLD_S + 60, "max_retries": 0,
               "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}}
    args = {"artifact": str(tmp_path / "router"), "backends": {model: backend for model in POOL}}
    try:
        deploy(port, args)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=HOLD_S + 120) as client:
            wait_for(lambda: client.get("/health").status_code == 200 and pool(client) == FIRST_POOL, "the fitted pool")

            # 3. Label the new model on prompts stratified over the router's latent tasks, then onboard it.
            code, _, err = run_label(capsys, "--prompts", tmp_path / "log.parquet", "--pool", replay_pool(tmp_path / "new", upstream, models=[NEW]),
                                     "--out", tmp_path / "labels_new", "--artifact", tmp_path / "router", "--budget", NEW_BUDGET,
                                     "--floor", FLOOR)
            assert code == 0, err
            assert len(labelled(tmp_path / "labels_new")) == NEW_BUDGET
            sampled = np.array(json.loads((tmp_path / "labels_new" / "_sample.json").read_text()))
            tasks = latent_tasks(router, embed_texts(prompts, router.embedder, use_ray=False), prompts)
            present, counts = np.unique(tasks, return_counts=True)
            assert len(present) > 1  # the pre-sample (10 x the budget) is the whole log here: quotas over all of it
            assert [int((tasks[sampled] == task).sum()) for task in present] == task_quotas(counts, NEW_BUDGET, FLOOR).tolist()
            assert main(["onboard", "--artifact", str(tmp_path / "router"), "--model", NEW, "--labels",
                         str(tmp_path / "labels_new" / "labels.jsonl"), "--out", str(tmp_path / "router_v2")]) == 0
            onboarded = RouterArtifact.load(tmp_path / "router_v2")
            assert onboarded.models == POOL and onboarded.posthoc is None

            # 4. Swap to it under load, while a cascade started on the fitted router waits for its first answer.
            held, load = prompts[0], prompts[1:]
            HeldReplay.held = held
            with ThreadPoolExecutor(1) as background:
                spanning = background.submit(chat, client, held, policy="cascade", cost_weight=0.0)
                assert HeldReplay.arrived.wait(60), "the cascade's first model was never asked"
                try:
                    responses = swap_under_load(client, port, args, tmp_path / "router_v2", POOL,
                                                ask=lambda client, number: chat(client, load[number % len(load)], preset="quality"))
                    wait_for(lambda: client.post("/v1/route", json={"prompt": held, "candidates": [NEW]}).status_code == 200,
                             "the ingress to decide with the onboarded router")
                finally:
                    HeldReplay.release.set()
                spanning = spanning.result()

            failed = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
            assert not failed, f"{len(failed)} of {len(responses)} requests failed during the swap: {failed[:3]}"
            assert all(r.json()["choices"][0]["message"]["content"] == HeldReplay.answers[(r.json()["model"], asked(r))] for r in responses)
            assert pool(client) == POOL and [b["model"] for b in client.get("/v1/backends").json()["data"]] == POOL

            # The cascade finished on the artifact it started on: decided among the fitted pool, first answer included.
            assert spanning.status_code == 200, spanning.text
            routing = spanning.json()["routing"]
            assert routing["policy"] == "cascade" and sorted(entry["model"] for entry in routing["decision"]["ranking"]) == sorted(FIRST_POOL)
            assert [run["model"] for run in routing["cascade"]][0] == HeldReplay.held_calls[0]
            assert spanning.json()["choices"][0]["message"]["content"] == HeldReplay.answers[(spanning.json()["model"], held)]
            # The onboarded router has no post-hoc estimator: a cascade asked of it now is routed, and says why.
            after = chat(client, load[0], policy="cascade")
            assert after.status_code == 200 and after.json()["routing"]["note"] == NO_ESTIMATOR

            # The new model is routed to, and answers.
            routed = [client.post("/v1/route", json={"prompt": prompt, "preset": "quality"}).json()["model"] for prompt in load[:40]]
            assert NEW in routed, routed
            answered = client.post("/v1/chat/completions", json={"model": NEW, "messages": [{"role": "user", "content": held}]})
            assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] == HeldReplay.answers[(NEW, held)]
    finally:
        serve.delete(APP)
        serve.shutdown()
