"""Loaders: the real datasets as SOURCE.md describes them, and bad files refused with a usable message."""

import gzip
import json

import numpy as np
import pytest

from training.datasets import (
    DatasetError,
    load_dataset,
    load_user_dataset,
    routerbench_question,
)
from training.splits import folds


@pytest.fixture(scope="module")
def llmrouter(shared_data):
    return load_dataset("llmrouter_9model", shared_data)


def test_llmrouter_matches_its_source(llmrouter):
    test = llmrouter.splits == "test"
    assert len(llmrouter.models) == 9 and test.sum() == 500
    # 119 test queries also appear in train; they are removed from train
    assert len(llmrouter) == 6108 - 119
    assert not set(np.asarray(llmrouter.prompts)[test]) & set(np.asarray(llmrouter.prompts)[~test])
    assert llmrouter.scores[test].mean(axis=0).max() == pytest.approx(0.563, abs=0.001)
    assert llmrouter.scores[test].max(axis=1).mean() == pytest.approx(0.743, abs=0.001)
    # cost = price x (prompt tokens + 256) / 1e6
    gemma = llmrouter.models.index("gemma-2-9b-it")
    np.testing.assert_allclose(llmrouter.costs[:, gemma], 0.1 * (llmrouter.prompt_tokens + 256) / 1e6)


def test_routerbench_drops_empty_scores_and_keeps_the_question(shared_data):
    table = load_dataset("routerbench_partial", shared_data)
    assert len(table.models) == 11
    assert not np.isnan(table.scores).any() and (table.costs > 0).all()
    assert not any(p.startswith("George wants to warm his hands") and p.count("Answer:") > 1 for p in table.prompts)
    test = table.splits == "test"
    assert table.scores[test].mean(axis=0).max() == pytest.approx(0.879, abs=0.002)


def test_routerbench_answers_belong_to_their_rows(shared_data):
    """On ARC every model that scored 1 gave the same letter: a response matched to the wrong row would not."""
    table = load_dataset("routerbench_partial", shared_data)
    assert table.responses.shape == table.scores.shape and table.responses.dtype == object
    arc = np.flatnonzero(table.benchmarks == "arc-challenge")
    for row in arc:
        right = {table.responses[row, j].strip()[:1] for j in np.flatnonzero(table.scores[row] == 1)}
        assert len(right) <= 1, (table.prompt_ids[row], right)
    kept = table.subset(arc[:10])
    assert kept.responses.tolist() == table.responses[arc[:10]].tolist()


def test_routerbench_question_is_the_final_block():
    field = repr(["Q1?\nA) x\nAnswer:\nA\n\nQ2?\nA) y\nAnswer:"])
    assert routerbench_question(field) == "Q2?\nA) y\nAnswer:"


def test_routerdc_is_scored_as_routerdc_scores_it(shared_data):
    table = load_dataset("routerdc_7model", shared_data)
    assert len(table.models) == 7 and not table.has_costs
    assert {"train", "test", "ood"} == set(table.splits)
    assert set(table.benchmarks[table.splits == "ood"]) == {"MATH_prealgebra", "ceval", "mbpp"}
    assert set(np.unique(table.scores[table.benchmarks == "mmlu"])) == {0.0, 1.0}  # correct or not
    assert len(np.unique(table.scores[table.benchmarks == "gsm8k"])) > 2  # the fraction of samples correct

    def best_single(split):  # RouterDC's figure: accuracy averaged over benchmarks
        rows = table.splits == split
        return np.mean([table.scores[rows & (table.benchmarks == b)].mean(axis=0) for b in set(table.benchmarks[rows])], axis=0).max()

    assert best_single("test") == pytest.approx(0.5456, abs=1e-4)
    assert best_single("ood") == pytest.approx(0.4395, abs=1e-4)


def test_alpacaeval_excludes_the_judge_attacks(shared_data):
    table = load_dataset("alpacaeval2_58model", shared_data)
    assert len(table.models) == 56 and "NullModel" not in table.models and "gpt4_gamed" not in table.models
    assert table.has_costs


def test_missing_builtin_file_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match="llmrouter_dcrouter_merged.jsonl.gz: no such file"):
        load_dataset("llmrouter_9model", tmp_path)


def test_malformed_builtin_file_names_the_file_and_field(tmp_path):
    folder = tmp_path / "routerbench_partial"
    folder.mkdir()
    with gzip.open(folder / "routerbench_partial_compact.csv.gz", "wt") as handle:
        handle.write("split,sample_id,eval_name,prompt,gpt-4\ntrain,a.1,mbpp,\"['Write code']\",1.0\n")
    with pytest.raises(DatasetError, match=r"routerbench_partial_compact.csv.gz: missing field 'gpt-4\|total_cost'"):
        load_dataset("routerbench_partial", tmp_path)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [
    {"prompt": "What is 2+2?", "scores": {"a": 1.0, "b": 0.0}, "costs": {"a": 0.002, "b": 0.0001}, "benchmark": "math"},
    {"prompt": "Write a haiku", "scores": {"a": 0.7, "b": 0.4}, "costs": {"a": 0.003, "b": 0.0002}, "split": "test"},
]


def test_user_jsonl_loads(tmp_path):
    table = load_user_dataset(_write_jsonl(tmp_path / "mine.jsonl", GOOD))
    assert table.models == ["a", "b"] and list(table.splits) == ["train", "test"]
    assert table.scores.tolist() == [[1.0, 0.0], [0.7, 0.4]] and table.has_costs


def test_user_dataset_without_responses_has_none_and_with_them_keeps_them(tmp_path):
    assert load_user_dataset(_write_jsonl(tmp_path / "plain.jsonl", GOOD)).responses is None
    answered = [{**row, "responses": {"a": f"answer a{i}", "b": f"answer b{i}"}} for i, row in enumerate(GOOD)]
    table = load_user_dataset(_write_jsonl(tmp_path / "answered.jsonl", answered))
    assert table.responses.tolist() == [["answer a0", "answer b0"], ["answer a1", "answer b1"]]


def test_user_parquet_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    table = load_user_dataset(path)
    assert table.models == ["a", "b"] and table.costs[1, 0] == pytest.approx(0.003)
    answered = [{**row, "responses": {"a": "A", "b": "B"}} for row in GOOD]
    pq.write_table(pa.Table.from_pylist(answered), path)
    assert load_user_dataset(path).responses.tolist() == [["A", "B"], ["A", "B"]]


def test_user_dataset_without_split_gets_a_seeded_split(tmp_path):
    rows = [{"prompt": f"q{i}", "scores": {"a": i % 2, "b": 1 - i % 2}} for i in range(40)]
    table = load_user_dataset(_write_jsonl(tmp_path / "mine.jsonl", rows))
    (fold,) = folds(table, "standard")
    assert len(fold.test) and len(fold.train) and not table.has_costs


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"scores": {"a": 1, "b": 0}}, r"row 2: column 'prompt': missing or empty"),
        ({"prompt": "x", "scores": {"a": 1}}, r"row 2: column 'scores': models differ from row 1 \(missing \['b'\]"),
        ({"prompt": "x", "scores": {"a": 1.5, "b": 0}}, r"row 2: column 'scores', model 'a': 1.5 is outside \[0, 1\]"),
        ({"prompt": "x", "scores": {"a": "high", "b": 0}}, r"row 2: column 'scores', model 'a': expected a finite number"),
        ({"prompt": "x", "scores": {"a": 1, "b": 0}, "costs": {"a": -1, "b": 0}}, r"row 2: column 'costs', model 'a'"),
        ({"prompt": "x", "scores": {"a": 1, "b": 0}, "split": "dev"}, r"row 2: column 'split': expected 'train' or 'test'"),
        ({"prompt": "x", "scores": {"a": 1, "b": 0}, "responses": {"a": "yes"}}, r"row 2: column 'responses': on some rows and not others"),
    ],
)
def test_user_dataset_rejects_bad_rows_naming_file_row_and_column(tmp_path, bad_row, message):
    path = _write_jsonl(tmp_path / "mine.jsonl", [GOOD[0], bad_row])
    with pytest.raises(DatasetError, match=str(path).replace(".", r"\.") + ": " + message):
        load_user_dataset(path)


def test_user_dataset_rejects_broken_json_and_unknown_formats(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "x", "scores": {"a": 1}}\n{"prompt": \n')
    with pytest.raises(DatasetError, match="mine.jsonl: row 2: not valid JSON"):
        load_user_dataset(path)
    with pytest.raises(DatasetError, match="unknown format"):
        load_user_dataset(tmp_path / "mine.csv")
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="broken.parquet: not a readable Parquet file"):
        load_user_dataset(bad_parquet)


def test_user_dataset_responses_must_name_the_scored_models_and_be_text(tmp_path):
    rows = [{**GOOD[0], "responses": {"a": "A", "b": "B"}}, {**GOOD[1], "responses": {"a": "A", "c": "C"}}]
    with pytest.raises(DatasetError, match="row 2: column 'responses': expected an object with the same models"):
        load_user_dataset(_write_jsonl(tmp_path / "mine.jsonl", rows))
    rows[1]["responses"] = {"a": "A", "b": 3}
    with pytest.raises(DatasetError, match="row 2: column 'responses': every answer must be a string"):
        load_user_dataset(_write_jsonl(tmp_path / "mine.jsonl", rows))
