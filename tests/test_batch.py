"""Batch routing job: one row per input row, the artifact's own decisions, clear errors, answers over HTTP."""

import json
import os
import subprocess
import sys
import time
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from conftest import small_fit_config, synthetic_routing_set
from fakes import FakeUpstream, serving

from serve.backends.retry import RetryPolicy
from serve.batch import answers, cli
from serve.batch.output import MANIFEST, missing_ranges
from serve.batch.ranking import DECISION_COLUMNS
from serve.core.artifact import RouterArtifact
from serve.core.decision import PRESETS
from training.fit import fit_router

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "def add(a, b): return a + b  # why does this fail on strings?",
    "What is the capital of France?",
    "Solve for x: 3x + 7 = 22.",
    "Write a haiku about autumn leaves.",
    "Which of the following is a prime number? A) 21 B) 23 C) 25 D) 27",
    "Translate 'good morning' into Spanish.",
] * 4


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    return fit_router(synthetic_routing_set(), small_fit_config(), log=lambda message: None).save(tmp_path_factory.mktemp("batch") / "router")


@pytest.fixture(scope="module")
def artifact(artifact_dir):
    return RouterArtifact.load(artifact_dir)


def direct_route(artifact, texts, cost_weight, **limits):
    """What the artifact decides for these texts, called the way the evaluation harness calls it."""
    from serve.core.encoder import count_tokens, encode, load_encoder

    return artifact.route(encode(load_encoder(artifact.embedder), texts), texts, count_tokens(texts, artifact.embedder), cost_weight, **limits)


def run_job(capsys, *args):
    code = cli.main([str(arg) for arg in args])
    return code, capsys.readouterr().err


# --- bad input: checked before any Ray work, so these are fast -------------------------------------------


@pytest.mark.parametrize(
    "name, write, extra, message",
    [
        ("in.parquet", lambda path: pd.DataFrame({"text": ["hi"]}).to_parquet(path), [], ["in.parquet", "no column 'prompt'", "'text'"]),
        ("in.parquet", lambda path: pd.DataFrame({"prompt": [1, 2]}).to_parquet(path), [], ["in.parquet", "'prompt' holds int64, not text"]),
        ("in.jsonl", lambda path: path.write_text(""), [], ["in.jsonl", "empty"]),
        ("in.jsonl", lambda path: path.write_text('{"prompt": "hi"}\nnot json\n'), ["--prompt-column", "question"], ["in.jsonl", "no column 'question'"]),
        ("in.jsonl", lambda path: path.write_text("\n[1, 2]\n"), [], ["in.jsonl", "line 2 is not a JSON object"]),
        ("in.jsonl", lambda path: path.write_bytes(b"\xff\xfe{}"), [], ["in.jsonl", "not UTF-8"]),
        ("in.parquet", lambda path: path.write_text("prompt\nhi\n"), [], ["in.parquet", "not a readable Parquet file"]),
        ("in.csv", lambda path: path.write_text("prompt\nhi\n"), [], ["in.csv", "unknown input format"]),
        ("in.parquet", lambda path: pd.DataFrame({"prompt": ["hi"], "routed_model": ["x"]}).to_parquet(path), [], ["in.parquet", "['routed_model']", "rename"]),
        ("in.parquet", lambda path: pd.DataFrame({"prompt": ["hi"]}).to_parquet(path), ["--candidates", "big", "gpt-9"], ["--candidates", "gpt-9"]),
        ("in.parquet", lambda path: pd.DataFrame({"prompt": ["hi"]}).to_parquet(path), ["--max-cost", "-1"], ["--max-cost"]),
        ("in.parquet", lambda path: pd.DataFrame({"prompt": ["hi"]}).to_parquet(path), ["--generate"], ["--generate needs --endpoint"]),
    ],
    ids=["missing-column", "not-text", "empty-file", "renamed-column", "not-an-object", "not-utf8", "not-parquet", "unknown-format", "column-clash",
         "unknown-candidate", "negative-cap", "generate-without-endpoint"],
)
def test_bad_input_names_the_file_and_column(tmp_path, capsys, artifact_dir, name, write, extra, message):
    write(tmp_path / name)
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / name, "--output", tmp_path / "out", *extra)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    for part in message:
        assert part in err
    assert not (tmp_path / "out").exists()


def test_refuses_a_missing_input_and_a_non_empty_output(tmp_path, capsys, ray_session, artifact_dir):
    # The output is checked once Ray is up (the job sizes its actors first): the session's Ray, not one this test
    # would start with the machine's CPU count for every later test.
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / "nowhere.parquet", "--output", tmp_path / "out")
    assert code == 2 and "nowhere.parquet: no such file or folder" in err
    pd.DataFrame({"prompt": ["hi"]}).to_parquet(tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_text("")
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / "in.parquet", "--output", tmp_path / "out")
    assert code == 2 and "not empty" in err


def test_refuses_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    pd.DataFrame({"prompt": ["hi"]}).to_parquet(tmp_path / "in.parquet")
    code, err = run_job(capsys, "--artifact", tmp_path, "--input", tmp_path / "in.parquet", "--output", tmp_path / "out")
    assert code == 2 and "not a router artifact" in err


# --- answers: the HTTP client against a real local server --------------------------------------------------


class _ScriptedEndpoint(FakeUpstream):
    """Answers /v1/chat/completions by the requested model's name: `flaky` fails twice with 503 first,
    `missing` is a 404, `garbled` returns a body that is not a chat completion, `slow` sleeps past the timeout."""

    calls: ClassVar[dict[str, int]] = {}

    def do_POST(self):
        body = self.read_json()
        model = body["model"]
        self.calls[model] = self.calls.get(model, 0) + 1
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": f"no route {self.path}"}})
        if model == "flaky" and self.calls[model] <= 2:
            return self.reply(503, {"error": {"message": "overloaded"}})
        if model == "missing":
            return self.reply(404, {"error": {"message": f"The model `{model}` does not exist."}})
        if model == "garbled":
            return self.reply(200, {"choices": []})
        if model == "slow":
            time.sleep(1.5)
        content = f"{body['messages'][0]['content']} / {self.headers.get('Authorization')} / {body['max_tokens']}"
        self.reply(200, self.completion(f"served-{model}", content))


FAST_RETRY = RetryPolicy(retries=3, backoff_s=0.01)


@pytest.fixture
def endpoint():
    _ScriptedEndpoint.calls = {}  # each test counts its own calls
    with serving(_ScriptedEndpoint) as url:
        yield url


def test_answer_posts_the_routed_model_and_retries_transient_failures(endpoint, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-test")
    with answers.answer_client(endpoint, concurrency=2, timeout_s=5, api_key_env="TEST_KEY") as client:
        assert answers.answer(client, "good", "hello", 7, FAST_RETRY) == ("hello / Bearer sk-test / 7", "served-good", None)
        assert answers.answer(client, "flaky", "hello", 7, FAST_RETRY)[1] == "served-flaky"
    assert _ScriptedEndpoint.calls["flaky"] == 3


def test_answer_records_failures_instead_of_raising(endpoint):
    with answers.answer_client(endpoint, concurrency=2, timeout_s=0.5, api_key_env=None) as client:
        answer, model, error = answers.answer(client, "missing", "hello", 7, FAST_RETRY)
        assert answer is None and model is None and error.startswith("HTTP 404") and "does not exist" in error
        assert answers.answer(client, "garbled", "hello", 7, FAST_RETRY)[2].startswith("not a chat completion")
        assert "ReadTimeout" in answers.answer(client, "slow", "hello", 7, FAST_RETRY)[2]
    assert _ScriptedEndpoint.calls["missing"] == 1 and _ScriptedEndpoint.calls["slow"] == FAST_RETRY.attempts
    with answers.answer_client("http://127.0.0.1:9/v1", concurrency=1, timeout_s=1, api_key_env=None) as client:
        assert "ConnectError" in answers.answer(client, "good", "hello", 7, FAST_RETRY)[2]


def test_the_answerer_closes_its_client_and_threads():
    answerer = answers.Answerer("http://127.0.0.1:9/v1", "prompt", 8, concurrency=2, timeout_s=1, api_key_env=None)
    answerer.close()
    assert answerer.client.is_closed
    with pytest.raises(RuntimeError):  # a closed pool takes no more work
        answerer.threads.submit(print)


# --- the Ray Data job ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_routes_a_parquet_file_like_the_artifact(tmp_path, capsys, ray_session, artifact_dir, artifact):
    frame = pd.DataFrame({"id": np.arange(len(PROMPTS)), "prompt": PROMPTS, "source": ["unit-test"] * len(PROMPTS)})
    frame.to_parquet(tmp_path / "prompts.parquet")
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / "prompts.parquet", "--output", tmp_path / "out",
                        "--preset", "quality", "--batch-size", 8)
    assert code == 0, err
    routed = pd.read_parquet(tmp_path / "out")
    assert list(routed.columns) == ["id", "prompt", "source", *DECISION_COLUMNS]
    assert routed["id"].tolist() == list(range(len(PROMPTS)))  # one row per input row, in input order
    assert routed["source"].tolist() == frame["source"].tolist()

    expected = direct_route(artifact, PROMPTS, PRESETS["quality"])
    rows = np.arange(len(PROMPTS))
    chosen = expected.order[:, 0]
    assert routed["routed_model"].tolist() == [artifact.models[m] for m in chosen]
    assert [list(ranked) for ranked in routed["ranked_models"]] == [[artifact.models[m] for m in order] for order in expected.order]
    np.testing.assert_allclose(routed["predicted_quality"].to_numpy(float), expected.quality[rows, chosen], rtol=1e-5)
    np.testing.assert_allclose(routed["estimated_cost_usd"].to_numpy(float), expected.cost[rows, chosen], rtol=1e-9)
    assert routed["task"].tolist() == expected.task.tolist()
    np.testing.assert_allclose(routed["task_probability"].to_numpy(float), expected.task_probability, rtol=1e-5)


@pytest.mark.slow
def test_routes_a_jsonl_folder_within_the_candidates_and_the_cost_cap(tmp_path, capsys, ray_session, artifact_dir, artifact):
    folder = tmp_path / "prompts"
    folder.mkdir()
    half = len(PROMPTS) // 2
    for part, rows in enumerate((range(half), range(half, len(PROMPTS)))):
        (folder / f"part-{part}.jsonl").write_text("".join(json.dumps({"n": i, "question": PROMPTS[i]}) + "\n" for i in rows))
    (folder / "part-2.jsonl").write_text(json.dumps({"n": len(PROMPTS), "question": None}) + "\n")
    (folder / "_SUCCESS").write_text("")
    cap = float(np.median(artifact.cost_model.estimate(np.array([20]))))
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", folder, "--output", tmp_path / "out", "--format", "jsonl",
                        "--prompt-column", "question", "--candidates", "big", "small", "--max-cost", cap, "--cost-weight", 0.01)
    assert code == 0, err
    routed = pd.concat([pd.read_json(path, lines=True) for path in sorted((tmp_path / "out").glob("part-*"))])
    assert routed["n"].tolist() == list(range(len(PROMPTS) + 1))  # the folder's files in name order, each in row order
    answered, unanswerable = routed.iloc[:-1], routed.iloc[-1]
    assert unanswerable[list(DECISION_COLUMNS)].isna().all()  # the row without a prompt kept, not routed

    allowed = np.isin(artifact.models, ["big", "small"])
    expected = direct_route(artifact, PROMPTS, 0.01, allowed=allowed, cost_cap=cap)
    assert answered["routed_model"].tolist() == [artifact.models[m] for m in expected.order[:, 0]]
    assert set(answered["routed_model"]) <= {"big", "small"}
    assert all(set(ranked) <= {"big", "small"} for ranked in answered["ranked_models"])
    assert (answered["estimated_cost_usd"] <= cap).all()


@pytest.mark.slow
def test_refuses_actors_that_would_hold_every_cpu(tmp_path, capsys, ray_session, artifact_dir):
    pd.DataFrame({"prompt": ["hi"]}).to_parquet(tmp_path / "in.parquet")
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / "in.parquet", "--output", tmp_path / "out", "--cpus-per-actor", 2)
    assert code == 2 and "--cpus-per-actor 2 leaves less than 0.5 of the cluster's 2 CPUs" in err


@pytest.mark.slow
def test_generates_answers_from_a_real_vllm_server(tmp_path, capsys, ray_session, artifact_dir, vllm_server):
    endpoint, served_model = vllm_server
    too_long = "Summarise this: " + "the quick brown fox jumps over the lazy dog " * 300  # past the server's 1024 tokens
    prompts = PROMPTS[:6] + [too_long]
    pd.DataFrame({"id": range(len(prompts)), "prompt": prompts}).to_parquet(tmp_path / "prompts.parquet")
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / "prompts.parquet", "--output", tmp_path / "out",
                        "--generate", "--endpoint", endpoint, "--max-tokens", 8, "--concurrency", 4)
    assert code == 0, err
    routed = pd.read_parquet(tmp_path / "out")
    assert routed["id"].tolist() == list(range(len(prompts)))
    answered, failed = routed.iloc[:-1], routed.iloc[-1]
    assert answered["error"].isna().all(), answered["error"].tolist()
    assert (answered["answer"].str.len() > 0).all() and (answered["answered_by"] == served_model).all()
    assert set(answered["routed_model"]) <= {"big", "mid", "small"}
    assert failed["error"].startswith("HTTP 400") and pd.isna(failed["answer"]) and failed["routed_model"] in {"big", "mid", "small"}


# --- resume ------------------------------------------------------------------------------------------------


def test_missing_ranges_are_the_gaps_between_done_parts():
    assert missing_ranges([], 10) == [(0, 10)]
    assert missing_ranges([(0, 3), (5, 7)], 10) == [(3, 5), (7, 10)]
    assert missing_ranges([(0, 4), (4, 10)], 10) == []


def test_resume_refuses_another_job_s_output(tmp_path, capsys, ray_session, artifact_dir):
    pd.DataFrame({"prompt": ["hi", "ho"]}).to_parquet(tmp_path / "in.parquet")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "old.parquet").write_text("")
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / "in.parquet", "--output", tmp_path / "other", "--resume")
    assert code == 2 and "was not written by this job" in err
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"cost_weight": 123}))
    code, err = run_job(capsys, "--artifact", artifact_dir, "--input", tmp_path / "in.parquet", "--output", out, "--resume")
    assert code == 2 and "was written with other" in err and "cost_weight" in err and "--resume" not in err.split("other")[0]


@pytest.mark.slow
def test_a_killed_job_resumed_writes_only_the_missing_rows_and_every_row_once(tmp_path, capsys, ray_session, artifact_dir, artifact):
    import ray

    rows = 1200
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (case {i})" for i in range(rows)]
    pd.DataFrame({"id": range(rows), "prompt": prompts}).to_parquet(tmp_path / "in.parquet", row_group_size=300)
    out = tmp_path / "out"
    job = ["--artifact", artifact_dir, "--input", tmp_path / "in.parquet", "--output", out, "--batch-size", 40, "--preset", "quality"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "serve.batch", *map(str, job)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*"))) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    driver.kill()  # SIGKILL: no cleanup of any kind
    driver.wait()
    written_before = {path.name: path.stat().st_mtime_ns for path in out.glob("part-*")}
    assert 0 < len(pd.read_parquet(out)) < rows, "the job should have been killed midway"

    code, err = run_job(capsys, *job, "--resume")
    assert code == 0, err
    assert {name: (out / name).stat().st_mtime_ns for name in written_before} == written_before  # not rewritten
    routed = pd.read_parquet(out)
    assert routed["id"].tolist() == list(range(rows))  # every row exactly once, in input order
    sample = np.random.default_rng(0).choice(rows, size=60, replace=False)
    expected = direct_route(artifact, [prompts[i] for i in sample], PRESETS["quality"])
    assert routed["routed_model"].iloc[sample].tolist() == [artifact.models[m] for m in expected.order[:, 0]]
    assert run_job(capsys, *job, "--resume")[0] == 0  # nothing left: a no-op
    assert pd.read_parquet(out)["id"].tolist() == list(range(rows))
