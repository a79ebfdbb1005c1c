"""The cascade-routing decision rule (serve.core.decision.cascade_step): NumPy only, milliseconds."""

import numpy as np
import pytest

from serve.core.decision import _expected_best, _supermodels, cascade_step, choose

RNG = np.random.default_rng(0)
QUALITY = RNG.random((50, 5))
COST = np.sort(RNG.random((50, 5)) + 0.1, axis=1)
NOTHING_RAN = np.zeros((50, 5), bool)


def _run(quality, cost, weight, scale, steps=5, **options):
    """Drive the rule with fixed post-hoc values (`quality` itself): the models run per prompt, in order."""
    ran = np.zeros(quality.shape, bool)
    order = [[] for _ in quality]
    for _ in range(steps):
        step = cascade_step(quality, cost, ran, weight, scale, **options)
        for row, model in enumerate(step.next_model):
            if model >= 0:
                assert not ran[row, model]
                ran[row, model] = True
                order[row].append(int(model))
    return order, ran


def test_expected_best_is_the_mean_of_the_maximum():
    quality, resolution = RNG.random((4, 3)), np.array([0.3, 1.0, 0.0])
    best_so_far = np.array([0.0, 0.5, 0.9, 0.2])
    members = _supermodels(3, 3)
    exact = _expected_best(best_so_far, quality, resolution, members)
    draws = RNG.random((200_000, 4, 3)) < quality
    outcome = (1 - resolution) * quality + resolution * draws  # [draws, N, M]
    for k, member in enumerate(members):
        simulated = np.maximum(best_so_far, outcome[:, :, member].max(axis=2)).mean(axis=0)
        np.testing.assert_allclose(exact[:, k], simulated, atol=4e-3)


def test_answers_that_say_nothing_make_cascading_routing():
    for weight in (0.0, 0.05, 0.5, 5.0):
        first = cascade_step(QUALITY, COST, NOTHING_RAN, weight, 1.0, resolution=0.0)
        assert first.next_model.tolist() == choose(QUALITY, COST, weight, 1.0).tolist()
        assert (first.answer == -1).all()
        ran = NOTHING_RAN.copy()
        ran[np.arange(50), first.next_model] = True
        second = cascade_step(QUALITY, COST, ran, weight, 1.0, resolution=0.0)
        assert (second.next_model == -1).all() and second.answer.tolist() == first.next_model.tolist()


def test_a_doubtful_cheap_answer_escalates_and_a_confident_one_stops():
    quality = np.array([[0.2, 0.9], [0.97, 0.9]])  # model 0 ran: post-hoc 0.2 (doubtful) and 0.97 (confident)
    cost = np.array([[1.0, 10.0], [1.0, 10.0]])
    ran = np.array([[True, False], [True, False]])
    step = cascade_step(quality, cost, ran, 0.1, 10.0, resolution=1.0)
    # running model 1 is worth 0.9 x (1 - best so far): 0.72 and 0.027 against a cost of 0.1
    assert step.next_model.tolist() == [1, -1] and step.answer.tolist() == [0, 0]


def test_the_cheap_model_goes_first_when_its_answer_may_save_the_dear_one():
    quality, cost = np.array([[0.8, 0.9]]), np.array([[1.0, 10.0]])
    step = cascade_step(quality, cost, np.zeros((1, 2), bool), 0.01, 10.0, resolution=1.0)
    assert step.next_model.tolist() == [0]


def test_depth_cap_and_candidates_are_respected():
    allowed = np.array([True, False, True, True, True])
    order, ran = _run(QUALITY, COST, 0.0, 1.0, resolution=1.0, allowed=allowed, max_depth=2)
    assert ran.sum(axis=1).max() == 2 and ran.sum(axis=1).min() >= 1
    assert not ran[:, 1].any()


def test_cost_cap_bounds_the_total_and_never_leaves_a_prompt_unanswered():
    order, ran = _run(QUALITY, COST, 0.0, 1.0, resolution=1.0, cost_cap=1.5)
    assert ran.any(axis=1).all()
    over = (COST * ran).sum(axis=1) > 1.5
    assert (ran[over].sum(axis=1) == 1).all()  # only where even the cheapest model costs more than the cap
    assert np.allclose((COST * ran)[over].sum(axis=1), COST[over].min(axis=1))


def test_higher_cost_weight_never_runs_more_models():
    runs = [_run(QUALITY, COST, w, 1.0, resolution=0.7)[1].sum() for w in (0.0, 0.01, 0.1, 1.0, 10.0)]
    assert runs == sorted(runs, reverse=True) and runs[-1] == 50


def test_excluding_every_model_is_an_error():
    with pytest.raises(ValueError, match="allowed"):
        cascade_step(QUALITY, COST, NOTHING_RAN, 0.0, 1.0, allowed=np.zeros(5, bool))
