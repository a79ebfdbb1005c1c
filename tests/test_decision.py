"""The shared decision rule."""

import numpy as np
import pytest

from serve.core.decision import CostModel, choose, rank_models

QUALITY = np.array([[0.9, 0.6, 0.3], [0.2, 0.8, 0.5]])
COST = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])


def test_zero_cost_weight_picks_the_best_predicted_model():
    assert list(choose(QUALITY, COST, 0.0, 3.0)) == [0, 1]


def test_huge_cost_weight_picks_the_cheapest():
    assert list(choose(QUALITY, COST, 1e6, 3.0)) == [2, 2]


def test_exact_ties_go_to_the_cheaper_model():
    assert list(choose(np.array([[0.5, 0.5, 0.5]]), COST[:1], 0.0, 3.0)) == [2]


def test_ranking_is_complete_for_fallback():
    order, eligible = rank_models(QUALITY, COST, 0.0, 3.0)
    assert order.tolist() == [[0, 1, 2], [1, 2, 0]]
    assert eligible.all()


def test_candidate_list_is_respected():
    allowed = np.array([False, True, True])
    order, eligible = rank_models(QUALITY, COST, 0.0, 3.0, allowed=allowed)
    assert order[:, 0].tolist() == [1, 1]
    assert eligible.sum(axis=1).tolist() == [2, 2]
    assert not eligible[0, order[0].tolist().index(0)]


def test_cost_cap_is_respected_and_never_leaves_a_prompt_unanswered():
    assert choose(QUALITY, COST, 0.0, 3.0, cost_cap=2.5).tolist() == [1, 1]
    order, eligible = rank_models(QUALITY, COST, 0.0, 3.0, cost_cap=0.1)
    assert order[:, 0].tolist() == [2, 2] and eligible.sum(axis=1).tolist() == [1, 1]


def test_a_candidate_list_that_excludes_everything_is_an_error():
    with pytest.raises(ValueError, match="allowed"):
        rank_models(QUALITY, COST, 0.0, 3.0, allowed=np.zeros(3, bool))


def test_cost_model_recovers_price_times_tokens():
    tokens = np.array([10, 50, 100, 400])
    price = np.array([0.1, 0.9]) / 1e6
    costs = (tokens[:, None] + 256) * price[None, :]
    model = CostModel.fit(tokens, costs)
    np.testing.assert_allclose(model.estimate(tokens), costs, rtol=1e-6)
