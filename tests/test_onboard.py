"""Onboarding, removing and repricing a pool model without retraining (training/onboard.py), on a small planted
routing problem: the model left out of training is the specialist of one prompt cluster."""

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import synthetic_routing_set

from serve.core.artifact import RouterArtifact
from serve.core.posthoc import logit
from training.fit import FitConfig, fit_router
from training.labelling.sampling import sample_per_task
from training.moe import NetworkConfig
from training.onboard import (
    Labels,
    OnboardConfig,
    label_evidence,
    onboard,
    remove_model,
    reprice,
    task_quality_column,
)
from training.routers.base import TrainingSet

SMALL = FitConfig(ks=(10,), mixes=(0.5,), resolutions=(1.0,), min_task_size=10, trainer="local", network=NetworkConfig(epochs=15, task_epochs=5))
NEW = "mid"  # the specialist of cluster 1 (tests/conftest.py)


@pytest.fixture(scope="module")
def data():
    return synthetic_routing_set(rows=600)


def without(data: TrainingSet, model: str) -> TrainingSet:
    keep = [j for j, m in enumerate(data.table.models) if m != model]
    table = data.table
    return TrainingSet(replace(table, models=[table.models[j] for j in keep], scores=table.scores[:, keep], costs=table.costs[:, keep],
                               prices={m: p for m, p in table.prices.items() if m != model}), data.embeddings)


@pytest.fixture(scope="module")
def left_out(data):
    return fit_router(without(data, NEW), SMALL, log=lambda message: None)


def labels_for(data, artifact, per_task, seed=0, model=NEW):
    tasks = artifact.task_probabilities(artifact.inputs(data.embeddings, data.table.prompts)).argmax(axis=1)
    rows = sample_per_task(tasks, per_task, seed)
    column = data.table.models.index(model)
    return Labels(data.embeddings[rows], [data.table.prompts[i] for i in rows], data.table.prompt_tokens[rows],
                  data.table.scores[rows, column], data.table.costs[rows, column]), rows


@pytest.fixture(scope="module")
def onboarded(data, left_out):
    labels, _ = labels_for(data, left_out, per_task=10)
    return onboard(left_out, NEW, labels)


def test_onboarding_leaves_every_other_model_s_estimates_and_costs_unchanged(data, left_out, onboarded):
    before, tasks_before = left_out.predict(data.embeddings, data.table.prompts)
    after, tasks_after = onboarded.predict(data.embeddings, data.table.prompts)
    assert onboarded.models == [*left_out.models, NEW]
    # Equal up to float32 rounding: the matrix products sum in another order with one more column.
    np.testing.assert_allclose(after[:, :-1], before, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tasks_after, tasks_before)
    tokens = data.table.prompt_tokens
    np.testing.assert_array_equal(onboarded.cost_model.estimate(tokens)[:, :-1], left_out.cost_model.estimate(tokens))


def test_the_onboarded_model_is_routed_to_the_prompts_it_is_good_at(data, onboarded):
    """At cost weight 0 the specialist of cluster 1 takes most of cluster 1 and little else."""
    decision = onboarded.route(data.embeddings, data.table.prompts, data.table.prompt_tokens, 0.0)
    chose_new = decision.order[:, 0] == onboarded.models.index(NEW)
    cluster1 = data.table.benchmarks == "kind1"
    assert chose_new[cluster1].mean() > 0.8 and chose_new[~cluster1].mean() < 0.2


def test_the_new_cost_model_comes_from_the_labels_costs(data, onboarded):
    column = data.table.models.index(NEW)
    np.testing.assert_allclose(onboarded.cost_model.estimate(data.table.prompt_tokens)[:, -1], data.table.costs[:, column], rtol=1e-6)


def test_the_head_is_the_task_table_in_logit_space_plus_the_fitted_pool_correction(data, left_out):
    labels, _ = labels_for(data, left_out, per_task=10)
    pool_logits, tasks = label_evidence(left_out, labels)
    inputs = left_out.inputs(data.embeddings, data.table.prompts)
    all_logits, all_tasks = left_out.moe_logits(inputs)
    for config in (OnboardConfig(head_ridge=None), OnboardConfig(head_ridge=3.0)):
        added = onboard(left_out, NEW, labels, config)
        column = added.weights["task_quality"][:, -1]
        np.testing.assert_allclose(column, task_quality_column(tasks, labels.scores, left_out.weights["task_quality"], config), rtol=1e-6)
        logits = added.moe_logits(inputs)[0][:, -1]
        table_part = all_tasks @ logit(column.astype(float))
        if config.head_ridge is None:
            np.testing.assert_allclose(logits, table_part, atol=1e-4)
        else:  # some correction by the pool's heads: not the table alone, and linear in the pool's logits
            residual = logits - table_part
            assert np.abs(residual).max() > 1e-3
            design = np.column_stack([all_logits, np.ones(len(all_logits))])
            _, error, *_ = np.linalg.lstsq(design, residual, rcond=None)
            assert error[0] / len(residual) < 1e-6


def test_the_profile_prior_fills_unlabelled_tasks_from_the_models_the_new_one_resembles():
    """A new model that is a copy of pool model 0: with labels on half the tasks, the profile prior puts the other
    half near model 0's column; the mean-only prior puts them at the mean label."""
    rng = np.random.default_rng(0)
    pool_table = rng.random((8, 3))
    tasks = np.repeat(np.eye(8)[:4], 10, axis=0)  # 10 labels on each of tasks 0-3, none on 4-7
    scores = tasks @ pool_table[:, 0]
    profile = task_quality_column(tasks, scores, pool_table, OnboardConfig(shrinkage=5.0, profile_ridge=1e-6))
    mean_only = task_quality_column(tasks, scores, pool_table, OnboardConfig(shrinkage=5.0, profile_ridge=None))
    unlabelled = slice(4, 8)
    profile_error = np.abs(profile[unlabelled] - pool_table[unlabelled, 0]).mean()
    mean_error = np.abs(mean_only[unlabelled] - pool_table[unlabelled, 0]).mean()
    assert profile_error < 0.5 * mean_error
    np.testing.assert_allclose(mean_only[unlabelled], scores.mean())


def test_the_pool_s_scores_of_the_labelled_prompts_tell_which_model_the_new_one_copies():
    """A new model that answers exactly as pool model 1 on every prompt: with the pool's scores of its labelled
    prompts, every task's estimate lands on model 1's column, labelled or not."""
    rng = np.random.default_rng(1)
    tasks = np.repeat(np.eye(6)[:3], 30, axis=0)  # labels on tasks 0-2 only
    pool_scores = (rng.random((len(tasks), 4)) < 0.5).astype(float)
    pool_table = rng.random((6, 4))
    column = task_quality_column(tasks, pool_scores[:, 1], pool_table, OnboardConfig(shrinkage=5.0, profile_ridge=1e-6), pool_scores)
    np.testing.assert_allclose(column, np.clip(pool_table[:, 1], 0, 1), atol=1e-4)


def test_removing_a_model_keeps_the_others_ranked_as_before(data, onboarded, tmp_path):
    removed = remove_model(onboarded, "small")
    keep = [onboarded.models.index(m) for m in removed.models]
    before = onboarded.predict(data.embeddings, data.table.prompts)[0][:, keep]
    saved = RouterArtifact.load(removed.save(tmp_path / "removed"))
    np.testing.assert_allclose(saved.predict(data.embeddings, data.table.prompts)[0], before, rtol=0, atol=1e-6)
    assert saved.models == ["big", NEW] and "small" not in saved.manifest["prices"]
    with pytest.raises(ValueError, match="not in the artifact's pool"):
        remove_model(onboarded, "absent")


def test_a_price_change_moves_that_model_s_cost_alone(data, left_out):
    repriced = reprice(left_out, "big", 0.5, 0.25)
    tokens = data.table.prompt_tokens
    before, after = left_out.cost_model.estimate(tokens), repriced.cost_model.estimate(tokens)
    big = left_out.models.index("big")
    np.testing.assert_array_equal(np.delete(after, big, axis=1), np.delete(before, big, axis=1))
    output_tokens = left_out.weights["cost_fixed"][big] * 1e6 / data.table.prices["big"][1]
    np.testing.assert_allclose(after[:, big], (tokens * 0.5 + output_tokens * 0.25) / 1e6, rtol=1e-5)
    assert repriced.manifest["prices"]["big"] == [0.5, 0.25] and repriced.cost_scale == left_out.cost_scale


def test_stratified_sampling_takes_k_per_task_or_all_of_a_small_task():
    tasks = np.array([0] * 10 + [1] * 2 + [2] * 5)
    rows = sample_per_task(tasks, 3, seed=0)
    assert np.bincount(tasks[rows]).tolist() == [3, 2, 3] and len(set(rows)) == len(rows)
    assert not np.array_equal(rows, sample_per_task(tasks, 3, seed=1))


def test_onboarding_refuses_a_model_already_in_the_pool_and_labels_without_costs(data, left_out):
    labels, _ = labels_for(data, left_out, per_task=3)
    with pytest.raises(ValueError, match="already in the pool"):
        onboard(left_out, "big", labels)
    with pytest.raises(ValueError, match="record no costs"):
        onboard(left_out, NEW, replace(labels, costs=None))
    priced = onboard(left_out, NEW, replace(labels, costs=None), prices=(0.3, 0.3))
    np.testing.assert_allclose(priced.cost_model.estimate(data.table.prompt_tokens)[:, -1],
                               left_out.cost_model.estimate(data.table.prompt_tokens)[:, left_out.models.index("big")] * 0.3, rtol=1e-5)


def test_the_onboard_and_pool_commands(data, left_out, tmp_path, capsys):
    """`python -m training onboard` reads the labels file (embedding its prompts), `pool` removes and reprices."""
    from training.__main__ import main

    left_out.save(tmp_path / "router")
    _, rows = labels_for(data, left_out, per_task=5)
    column = data.table.models.index(NEW)
    with open(tmp_path / "labels.jsonl", "w") as handle:
        for i in rows:
            handle.write(json.dumps({"prompt": data.table.prompts[i], "scores": {NEW: data.table.scores[i, column]},
                                     "costs": {NEW: data.table.costs[i, column]}}) + "\n")
    assert main(["onboard", "--artifact", str(tmp_path / "router"), "--model", NEW, "--labels", str(tmp_path / "labels.jsonl"),
                 "--out", str(tmp_path / "onboarded")]) == 0
    assert RouterArtifact.load(tmp_path / "onboarded").models == ["big", "small", NEW]
    assert main(["pool", "--artifact", str(tmp_path / "onboarded"), "--remove", "small", "--price", f"{NEW}=0.1,0.2",
                 "--out", str(tmp_path / "edited")]) == 0
    edited = RouterArtifact.load(tmp_path / "edited")
    assert edited.models == ["big", NEW] and edited.manifest["prices"][NEW] == [0.1, 0.2]
    assert main(["onboard", "--artifact", str(tmp_path / "router"), "--model", "other", "--labels", str(tmp_path / "labels.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "column 'scores' has no model 'other'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pool", "--artifact", str(tmp_path / "router"), "--price", "big=cheap", "--out", str(tmp_path / "x")])
