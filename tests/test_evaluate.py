"""The evaluation harness and its protocols on a small planted problem (no Ray)."""

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import synthetic_routing_set

from training.evaluate import evaluate, write_report
from training.metrics import aiq
from training.splits import folds, training_rows


@pytest.fixture(scope="module")
def table_and_embeddings():
    data = synthetic_routing_set(rows=300)
    splits = np.where(np.arange(300) % 3 == 0, "test", "train").astype(object)
    prompts = list(data.table.prompts)
    prompts[1] = prompts[2]  # a duplicate prompt: must never straddle train and test
    return replace(data.table, splits=splits, prompts=prompts), data.embeddings


def test_cv_folds_partition_the_prompts_and_keep_duplicates_together(table_and_embeddings):
    table, _ = table_and_embeddings
    fold_list = folds(table, "cv")
    assert len(fold_list) == 5
    tested = np.concatenate([f.test for f in fold_list])
    assert sorted(tested) == list(range(len(table)))
    for fold in fold_list:
        assert not set(fold.train) & set(fold.test)
        assert (1 in fold.test) == (2 in fold.test)


def test_lobo_holds_out_each_benchmark(table_and_embeddings):
    table, _ = table_and_embeddings
    for fold in folds(table, "lobo"):
        assert set(table.benchmarks[fold.test]) == {fold.name}
        assert fold.name not in set(table.benchmarks[fold.train])


def test_standard_uses_the_dataset_split(table_and_embeddings):
    table, _ = table_and_embeddings
    (fold,) = folds(table, "standard")
    assert set(table.splits[fold.test]) == {"test"} and set(table.splits[fold.train]) == {"train"}


def test_report_figures_and_files(tmp_path, table_and_embeddings):
    table, embeddings = table_and_embeddings
    routers = ["random", "cheapest", "best_single", "zero_router", "oracle", "prior", "knn", "cluster"]
    report = evaluate(table, embeddings, "standard", routers=routers, seeds=(0, 1), bootstrap_samples=50, progress=False)
    entries = report["routers"]
    test = table.subset(table.splits == "test")
    single_cost, single_quality = test.costs.mean(axis=0), test.scores.mean(axis=0)
    # the zero router is exactly the hull of the single models
    assert entries["zero_router"]["aiq"] == pytest.approx(aiq(single_cost, single_quality, single_cost.min(), single_cost.max()))
    assert entries["best_single"]["best_quality"] == pytest.approx(single_quality.max())
    assert entries["oracle"]["best_quality"] == pytest.approx(test.scores.max(axis=1).mean())
    # the zero router reaches its own best model's quality at exactly that model's cost (no float-sum miss)
    assert entries["zero_router"]["cost_to_reach_best_single"] == pytest.approx(1.0)
    # the prior ignores the prompt: at cost weight 0 it sends every prompt to the best model on training data
    train = table.subset(table.splits == "train")
    assert report["curves"]["prior"]["quality"][0] == pytest.approx(test.scores[:, train.scores.mean(axis=0).argmax()].mean())
    for name in routers:
        assert entries[name]["aiq"] <= entries["oracle"]["aiq"] + 1e-9
    # the planted specialists are learnable: a kNN router beats every fixed model
    assert entries["knn"]["aiq"] > entries["zero_router"]["aiq"]
    assert len(entries["knn"]["seeds"]) == 2 and {"gain_vs_zero_router", "gain_vs_prior"} <= set(entries["knn"])
    assert set(entries["knn"]["per_benchmark"]) == set(table.benchmarks)
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["dataset"] == "synthetic" and saved["protocol"] == "standard"
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert "| knn |" in (tmp_path / "report.md").read_text()


def test_cv_reports_each_fold(table_and_embeddings):
    table, embeddings = table_and_embeddings
    report = evaluate(table, embeddings, "cv", routers=["zero_router", "knn"], seeds=(0,), bootstrap_samples=20, progress=False)
    knn = report["routers"]["knn"]
    assert len(knn["per_fold"]) == 5
    assert knn["aiq"] == pytest.approx(np.mean([f["aiq"] for f in knn["per_fold"].values()]))


def test_a_production_fit_trains_on_every_training_row(table_and_embeddings):
    table, _ = table_and_embeddings
    np.testing.assert_array_equal(training_rows(table), np.flatnonzero(table.splits == "train"))
    unsplit = replace(table, splits=np.full(len(table), "train", dtype=object))
    assert len(training_rows(unsplit)) == len(table)
    held = np.setdiff1d(np.arange(len(table)), training_rows(unsplit, holdout=0.3, seed=1))
    assert 0.2 * len(table) < len(held) < 0.4 * len(table)
    assert (1 in held) == (2 in held)  # duplicates stay together
