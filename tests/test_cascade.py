"""Answer-aware cascades: answer facts, the post-hoc estimator, and the cascades the evaluation plays (no Ray)."""

from dataclasses import replace

import numpy as np
import pytest
from conftest import small_fit_config, synthetic_routing_set

from serve.core.answer_facts import (
    AnswerFacts,
    agreement,
    choice_letter,
    code_of,
    is_refusal,
    parses_as_python,
)
from serve.core.posthoc import FEATURE_GROUPS
from training.posthoc import fit_logistic, fit_posthoc
from training.routers.base import TrainingSet
from training.routers.cascade import agreement_outcome, frugal_outcome, run_cascade

LETTERS = np.array(list("ABCD"))


def answered_set(rows: int = 600, seed: int = 0) -> TrainingSet:
    """The planted routing problem with multiple-choice answers: a right answer names the prompt's letter, a
    wrong one another letter; an answer's embedding is its letter's direction plus noise."""
    data = synthetic_routing_set(rows=rows, seed=seed)
    rng = np.random.default_rng(seed + 1)
    right = rng.integers(0, 4, rows)
    wrong = (right[:, None] + rng.integers(1, 4, data.table.scores.shape)) % 4
    picked = np.where(data.table.scores == 1, right[:, None], wrong)
    directions = rng.normal(size=(4, 384))
    vectors = directions[picked] + 0.5 * rng.normal(size=(*picked.shape, 384))
    vectors = (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)
    responses = LETTERS[picked].astype(object)
    table = replace(data.table, responses=responses)
    return TrainingSet(table, data.embeddings, AnswerFacts.of(responses, vectors))


def test_answer_checks():
    assert [choice_letter(t) for t in ("B", "C\n", "(D) Paris", "The answer is A.", "A function that adds", "I do")] == ["B", "C", "D", "A", None, None]
    assert code_of("Here:\r\n```python\r\ndef f(x):\r\n    return x\r\n```") is not None
    assert code_of("[PYTHON]\ndef f(:\n[/PYTHON]") == "def f(:\n" and not parses_as_python("def f(:\n")
    assert parses_as_python("def f(x):\n    return x\n") and code_of("no code here") is None
    assert is_refusal("I'm sorry, I cannot help with that") and is_refusal("I do") and not is_refusal("I do think it is B")


def test_agreement_is_equal_letters_else_the_embedding_cosine():
    responses = np.array([["A", "A", "B", "some text"]], dtype=object)
    vectors = np.eye(4, dtype=np.float32)[None]
    vectors[0, 3] = vectors[0, 0]
    agree = agreement(AnswerFacts.of(responses, vectors))[0]
    assert agree[0, 1] == 1 and agree[0, 2] == 0 and agree[0, 3] == pytest.approx(1.0) and agree[1, 3] == pytest.approx(0.0)


def test_fit_logistic_recovers_the_planted_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3))
    y = (rng.random(20_000) < 1 / (1 + np.exp(-(x @ [1.5, -2.0, 0.0] + 0.5)))).astype(float)
    np.testing.assert_allclose(fit_logistic(x, y, l2=1e-3), [1.5, -2.0, 0.0, 0.5], atol=0.1)


def _log_loss(p, y):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_agreement_with_other_answers_sharpens_the_estimate():
    data = answered_set()
    fit, rest = data.validation_split(0, fraction=0.5)
    calibration, held_out = rest.validation_split(1, fraction=0.5)
    ex_ante = np.full(held_out.table.scores.shape, 0.5)
    everything_seen = np.ones(held_out.table.scores.shape, bool)
    losses = {}
    for name, groups in {"all": FEATURE_GROUPS, "no_agreement": tuple(g for g in FEATURE_GROUPS if "agreement" not in g)}.items():
        estimator = fit_posthoc(fit.answers, fit.table.scores, calibration.answers, calibration.table.scores,
                                         np.full(calibration.table.scores.shape, 0.5), groups)
        estimate = estimator.estimate(ex_ante, held_out.answers, agreement(held_out.answers), everything_seen)
        losses[name] = _log_loss(estimate, held_out.table.scores)
        assert abs(estimate.mean() - held_out.table.scores.mean()) < 0.05  # calibrated in the large
        assert estimator.resolution.shape == (3, 4) and ((estimator.resolution >= 0) & (estimator.resolution <= 1)).all()
    assert losses["all"] < losses["no_agreement"] - 0.02


def test_played_cascade_pays_for_every_model_it_runs_and_returns_one_of_their_answers():
    data = answered_set()
    fit, rest = data.validation_split(0, fraction=0.5)
    calibration, test = rest.validation_split(1, fraction=0.5)
    estimator = fit_posthoc(fit.answers, fit.table.scores, calibration.answers, calibration.table.scores,
                                     np.full(calibration.table.scores.shape, 0.5))
    ex_ante = np.tile(fit.table.scores.mean(axis=0), (len(test.table), 1))
    rows = np.arange(len(test.table))
    depth_used = []
    for weight in (0.0, 0.05, 1e3):
        outcome = run_cascade(ex_ante, test.table.costs, test, estimator, weight, test.table.costs.mean(axis=0).max())
        ran = np.zeros(test.table.scores.shape, bool)
        for step in outcome.runs.T:
            ran[rows[step >= 0], step[step >= 0]] = True
        np.testing.assert_allclose(outcome.cost, (test.table.costs * ran).sum(axis=1))
        assert ran[rows, outcome.answer].all()
        np.testing.assert_array_equal(outcome.quality, test.table.scores[rows, outcome.answer])
        depth_used.append(ran.sum(axis=1).mean())
    assert depth_used[0] >= depth_used[1] >= depth_used[-1] == 1.0  # dearer models: never more of them
    free = run_cascade(ex_ante, test.table.costs, test, estimator, 0.0, 1.0)
    assert free.quality.mean() >= test.table.scores.mean(axis=0).max()  # never worse than the best single model


def test_agreement_and_frugal_outcomes_by_hand():
    responses = np.array([["A", "A", "B"], ["A", "C", "B"]], dtype=object)
    facts = AnswerFacts.of(responses, np.tile(np.eye(3, dtype=np.float32), (2, 1, 1)))
    table = replace(answered_set(rows=2).table, scores=np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]),
                    costs=np.array([[1.0, 2.0, 10.0], [1.0, 2.0, 10.0]]))
    cost, quality = agreement_outcome((0, 1), 2, 0.9, table, facts, agreement(facts))
    assert cost.tolist() == [3.0, 13.0] and quality.tolist() == [1.0, 1.0]
    score = np.array([[0.9, 0.5, 0.5], [0.2, 0.4, 0.5]])
    cost, quality = frugal_outcome((0, 1, 2), (0.8, 0.8), table, score)
    assert cost.tolist() == [1.0, 13.0] and quality.tolist() == [1.0, 1.0]


def test_harness_runs_the_cascades_beside_the_routers_and_says_when_there_are_no_answers():
    from training.evaluate import evaluate, markdown_table

    data = answered_set(rows=300)
    table = replace(data.table, splits=np.where(np.arange(300) % 3 == 0, "test", "train").astype(object))
    routers = ["zero_router", "finerouter", "cascade", "agreement_cascade", "frugal_cascade"]
    report = evaluate(table, data.embeddings, "standard", routers=routers, seeds=(0,), bootstrap_samples=20, progress=False,
                      answer_embeddings=data.answers.embeddings)
    assert list(report["routers"]) == routers and "note" not in report
    cascade = report["routers"]["cascade"]
    assert cascade["aiq"] is not None and "gain_vs_best_baseline" in cascade
    assert cascade["gain_vs_best_other"]["router"] in {"finerouter", "agreement_cascade", "frugal_cascade"}
    plain = evaluate(replace(table, responses=None), data.embeddings, "standard", routers=routers, seeds=(0,), bootstrap_samples=0, progress=False)
    assert list(plain["routers"]) == ["zero_router", "finerouter", "cascade"]
    assert plain["routers"]["cascade"]["aiq"] == pytest.approx(plain["routers"]["finerouter"]["aiq"])
    assert "reduce to routing" in markdown_table(plain)


def test_the_artifact_carries_the_post_hoc_estimator_and_reads_older_ones_without(tmp_path):
    import json

    from serve.core.artifact import ArtifactError, RouterArtifact
    from training.fit import fit_router
    from training.routers.cascade import fit_cascade_estimator

    data = answered_set(rows=300)
    config = small_fit_config(epochs=5, task_epochs=2)
    router = fit_router(data, config, log=lambda message: None)
    estimator, scale = fit_cascade_estimator(router, data, config.seed)
    path = router.with_posthoc(estimator, {"resolution_scale": scale}).save(tmp_path / "router")
    loaded = RouterArtifact.load(path)
    assert loaded.manifest["posthoc"] == {"groups": list(estimator.groups), "resolution_scale": scale}
    for name, array in estimator.arrays().items():
        np.testing.assert_array_equal(getattr(loaded.posthoc, name), array)
    ex_ante, seen = np.full(data.table.scores.shape, 0.5), np.ones(data.table.scores.shape, bool)
    agree = agreement(data.answers)
    np.testing.assert_array_equal(loaded.posthoc.estimate(ex_ante, data.answers, agree, seen), estimator.estimate(ex_ante, data.answers, agree, seen))

    assert RouterArtifact.load(router.save(tmp_path / "plain")).posthoc is None
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))  # written before estimators
    assert RouterArtifact.load(tmp_path / "plain").posthoc is None
    (path / "manifest.json").write_text(json.dumps({**json.loads((path / "manifest.json").read_text()), "models": ["big", "mid"]}))
    with pytest.raises(ArtifactError, match="weights are for 3 models, the manifest lists 2"):
        RouterArtifact.load(path)


def test_a_played_cascade_asks_another_model_when_an_answer_does_not_come():
    from serve.core.cascade import play_cascade

    data = answered_set(rows=200)
    fit, calibration = data.validation_split(0, fraction=0.5)
    estimator = fit_posthoc(fit.answers, fit.table.scores, calibration.answers, calibration.table.scores,
                            np.full(calibration.table.scores.shape, 0.5))
    agree = agreement(calibration.answers)

    class FirstCallFails:
        """Every prompt's first call fails; the others answer as recorded."""

        def __init__(self):
            self.asked: dict[int, list[int]] = {}

        def obtain(self, rows, models):
            came = np.array([row in self.asked for row in rows.tolist()])
            for row, model in zip(rows.tolist(), models.tolist()):
                self.asked.setdefault(row, []).append(model)
            return came, calibration.table.costs[rows, models]

        def judged(self, rows):
            return calibration.answers.subset(rows), agree[rows]

    n = len(calibration.table)
    source = FirstCallFails()
    play = play_cascade(estimator, np.full((n, 3), 0.5), calibration.table.costs, source, 0.0, 1.0, max_depth=1)
    first, second = zip(*(source.asked[row] for row in range(n)))
    assert play.answer.tolist() == list(second) and all(a != b for a, b in zip(first, second))
    assert play.ran.sum(axis=1).tolist() == [1] * n and play.runs[:, 0].tolist() == list(second)
