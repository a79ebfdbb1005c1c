"""Served = evaluated, for cascades: RouterBench prompts through the Serve graph and through the batch job take
exactly the steps, and return exactly the answers, that the evaluation's cascade takes on the recorded answers.

A small RouterBench sample (a pool of four models, with their recorded answers) is fitted as `python -m training
fit` fits it, post-hoc estimator included. Every pool model is an `openai` backend on a fake upstream that replays
the model's recorded answer to each prompt.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import ClassVar

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import small_fit_config
from fakes import FakeUpstream, serving
from serve_fixtures import deployed

pytestmark = pytest.mark.slow

POOL = ["mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "gpt-3.5-turbo-1106", "gpt-4-1106-preview"]
TRAIN_PROMPTS, TEST_PROMPTS = 300, 30
COST_WEIGHT = 0.05
# On this small sample the fitted resolution scale is 0 (the cascade is routing); this resolution makes some
# cascades stop at the first answer and others go on to a second or a third, so that every path is compared.
RESOLUTION = 0.15


@pytest.fixture(scope="module")
def sample(shared_data):
    """RouterBench's answered prompts, each text once, for the pool: seeded training and test rows, with their
    embeddings and what their answers say (the training command's inputs)."""
    from serve.core.answer_facts import AnswerFacts
    from training.answers import embed_answers
    from training.datasets import load_dataset
    from training.embed import embed_texts
    from training.routers.base import TrainingSet

    table = load_dataset("routerbench_partial")
    texts, counts = np.unique(np.asarray(table.prompts, dtype=object), return_counts=True)
    once = np.isin(np.asarray(table.prompts, dtype=object), texts[counts == 1])
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(once & (table.splits == split)), size, replace=False)
                                   for split, size in (("train", TRAIN_PROMPTS), ("test", TEST_PROMPTS))]))
    columns = [table.models.index(model) for model in POOL]
    table = table.subset(rows)
    table = replace(table, models=POOL, scores=table.scores[:, columns], costs=table.costs[:, columns],
                    responses=table.responses[:, columns])
    answers = AnswerFacts.of(table.responses, embed_answers(table.responses))
    whole = TrainingSet(table, embed_texts(table.prompts, use_ray=False), answers)
    return whole.subset(table.splits == "train"), whole.subset(table.splits == "test")


@pytest.fixture(scope="module")
def artifact_dir(sample, tmp_path_factory):
    from training.routers.cascade import fit_with_cascades

    config = small_fit_config(epochs=10, task_epochs=3)
    artifact = fit_with_cascades(sample[0], config, log=lambda message: None)
    estimator = replace(artifact.posthoc, resolution=np.full_like(artifact.posthoc.resolution, RESOLUTION))
    return artifact.with_posthoc(estimator, artifact.manifest["posthoc"]).save(tmp_path_factory.mktemp("cascade") / "router")


@pytest.fixture(scope="module")
def offline(sample, artifact_dir):
    """The evaluation's cascade on the test prompts' recorded answers: (texts, responses [N, M], outcome)."""
    from serve.core.artifact import RouterArtifact
    from training.routers.cascade import run_cascade

    artifact, test = RouterArtifact.load(artifact_dir), sample[1]
    ex_ante = artifact.predict(test.embeddings, test.table.prompts)[0]
    outcome = run_cascade(ex_ante, artifact.cost_model.estimate(test.table.prompt_tokens), test, artifact.posthoc, COST_WEIGHT,
                          artifact.cost_scale)
    steps = (outcome.runs >= 0).sum(axis=1)
    assert steps.max() > 1 and steps.min() == 1, "the sample should hold cascades that stop at once and cascades that go on"
    return test.table.prompts, test.table.responses, outcome


def expected_runs(outcome, row) -> list[str]:
    return [POOL[model] for model in outcome.runs[row] if model >= 0]


class RecordedAnswers(FakeUpstream):
    """An OpenAI-compatible upstream that answers each pool model with its recorded answer to the prompt. A prompt
    it has no answers for is answered by the cheapest model alone; the others fail with HTTP 500."""

    answers: ClassVar[dict[tuple[str, str], str]] = {}

    def do_POST(self):
        body = self.read_json()
        text = self.answers.get((body["model"], body["messages"][-1]["content"]), "B" if body["model"] == POOL[0] else None)
        if text is None:
            return self.reply(500)
        self.reply(200, self.completion(body["model"], text))


@pytest.fixture(scope="module")
def upstream(offline):
    texts, responses, _ = offline
    RecordedAnswers.answers = {(model, prompt): responses[row, column] for row, prompt in enumerate(texts) for column, model in enumerate(POOL)}
    with serving(RecordedAnswers) as url:
        yield url


def test_the_batch_job_takes_the_evaluation_s_steps(tmp_path, capsys, ray_session, artifact_dir, offline, upstream):
    from serve.batch import cli

    texts, responses, outcome = offline
    pd.DataFrame({"prompt": texts}).to_parquet(tmp_path / "prompts.parquet")
    code = cli.main(["--artifact", str(artifact_dir), "--input", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
                     "--cost-weight", str(COST_WEIGHT), "--generate", "--endpoint", upstream, "--policy", "cascade"])
    assert code == 0, capsys.readouterr().err
    rows = pd.read_parquet(tmp_path / "out")
    assert rows["prompt"].tolist() == texts and rows["error"].isna().all()
    assert [list(models) for models in rows["cascade_models"]] == [expected_runs(outcome, row) for row in range(len(texts))]
    assert rows["answered_by"].tolist() == [POOL[model] for model in outcome.answer]
    assert rows["answer"].tolist() == [responses[row, model] for row, model in enumerate(outcome.answer)]
    assert [len(costs) for costs in rows["cascade_estimated_cost_usd"]] == [len(expected_runs(outcome, row)) for row in range(len(texts))]
    np.testing.assert_allclose(rows["estimated_cost_usd"], [sum(costs) for costs in rows["cascade_estimated_cost_usd"]])


@pytest.fixture(scope="module")
def api(ray_session, artifact_dir, upstream):
    backends = {model: {"kind": "openai", "base_url": upstream, "timeout_s": 30, "max_retries": 0,
                        "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}} for model in POOL}
    config = {"artifact": str(artifact_dir), "backends": backends, "default_policy": "cascade", "max_attempts": len(POOL),
              "cooldown": {"allowed_fails": 1000}}  # the failing backends below must not cool down
    with deployed(config, "cascades") as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def ask(api, prompt, **fields):
    return api.post("/v1/chat/completions", json={"model": "router", "messages": [{"role": "user", "content": prompt}],
                                                  "cost_weight": COST_WEIGHT, **fields})


def test_served_cascades_take_the_evaluation_s_steps_and_return_its_answers(api, offline):
    texts, responses, outcome = offline
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda text: ask(api, text), texts))  # the app's default policy: cascade
    for row, response in enumerate(served):
        assert response.status_code == 200, response.text
        body, runs = response.json(), expected_runs(outcome, row)
        routing = body["routing"]
        assert routing["policy"] == "cascade" and [run["model"] for run in routing["cascade"]] == runs, f"prompt {row}"
        assert body["model"] == POOL[outcome.answer[row]] == response.headers["x-router-model"]
        assert body["choices"][0]["message"]["content"] == responses[row, outcome.answer[row]]
        assert response.headers["x-router-cascade"] == ",".join(runs) and response.headers["x-router-policy"] == "cascade"
        total = sum(run["estimated_cost"] for run in routing["cascade"])
        assert float(response.headers["x-router-estimated-cost"]) == pytest.approx(total, rel=1e-6)
        answered = next(run for run in routing["cascade"] if run["model"] == body["model"])
        assert answered["posthoc_quality"] == max(run["posthoc_quality"] for run in routing["cascade"])


def test_a_streamed_cascade_streams_the_chosen_answer(api, offline):
    texts, responses, outcome = offline
    row = int(np.argmax((outcome.runs >= 0).sum(axis=1)))  # a cascade that asked more than one model
    response = ask(api, texts[row], stream=True, stream_options={"include_usage": True})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {POOL[outcome.answer[row]]}
    assert [run["model"] for run in chunks[0]["routing"]["cascade"]] == expected_runs(outcome, row)
    assert "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]) == responses[row, outcome.answer[row]]
    assert chunks[-1]["usage"]["total_tokens"] == 2


def test_route_is_still_one_model_and_route_only_refuses_a_cascade(api, offline):
    texts, _, _ = offline
    routed = ask(api, texts[0], policy="route")
    assert routed.status_code == 200 and routed.json()["routing"]["policy"] == "route"
    assert routed.json()["routing"]["cascade"] is None and "x-router-cascade" not in routed.headers
    refused = api.post("/v1/route", json={"prompt": texts[0], "policy": "cascade"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "policy"
    wrong = ask(api, texts[0], policy="waterfall")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "policy"


def test_a_cascade_asks_another_model_when_a_backend_fails(api):
    response = ask(api, "A prompt the upstream has no recorded answers for: which letter?", cost_weight=0.0)
    assert response.status_code == 200, response.text
    body = response.json()
    routing = body["routing"]
    failed = [fallback["model"] for fallback in routing["fallbacks"]]
    assert body["model"] == POOL[0] and [run["model"] for run in routing["cascade"]] == [POOL[0]]
    assert failed and len(set(failed)) == len(failed) and POOL[0] not in failed  # none asked twice
    assert all(fallback["reason"] == "HTTP 500" for fallback in routing["fallbacks"])
    assert response.headers["x-router-fallbacks"] == str(len(failed))
