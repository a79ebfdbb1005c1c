"""Hull, AIQ and cost-to-reach on hand-computed cases."""

import numpy as np
import pytest

from training.metrics import aiq, bootstrap_gain, cost_to_reach, frontier


def test_linear_hull_between_two_points():
    assert aiq([1, 3], [0.5, 0.9], lo=1, hi=3) == pytest.approx(0.7)


def test_point_under_the_chord_changes_nothing():
    assert aiq([1, 2, 3], [0.5, 0.6, 0.9], lo=1, hi=3) == pytest.approx(0.7)
    assert list(frontier(np.array([1, 2, 3]), np.array([0.5, 0.6, 0.9]))[0]) == [1, 3]


def test_point_above_the_chord_raises_the_hull():
    # (0.5 + 0.8) / 2 + (0.8 + 0.9) / 2 = 1.5 over a width of 2
    assert aiq([1, 2, 3], [0.5, 0.8, 0.9], lo=1, hi=3) == pytest.approx(0.75)


def test_zero_left_of_the_cheapest_point():
    # nothing on [1, 2), then (0.6 + 0.9) / 2 on [2, 3]
    assert aiq([2, 3], [0.6, 0.9], lo=1, hi=3) == pytest.approx(0.375)


def test_flat_right_of_the_most_expensive_point():
    # 0.7 on [1, 2] then 0.9 on [2, 3]
    assert aiq([1, 2], [0.5, 0.9], lo=1, hi=3) == pytest.approx(0.8)


def test_hull_is_non_decreasing():
    # the dearer, worse point is dominated: the hull stays at 0.9
    assert aiq([1, 3], [0.9, 0.5], lo=1, hi=3) == pytest.approx(0.9)
    assert list(frontier(np.array([1.0, 3.0]), np.array([0.9, 0.5]))[1]) == [0.9]


def test_equal_costs_keep_the_better_point():
    assert aiq([1, 1, 3], [0.2, 0.5, 0.9], lo=1, hi=3) == pytest.approx(0.7)


def test_no_trade_off_gives_no_aiq():
    assert aiq([1, 1], [0.5, 0.6], lo=1, hi=1) is None


def test_cost_to_reach_interpolates_on_the_hull():
    assert cost_to_reach([1, 3], [0.5, 0.9], 0.7) == pytest.approx(2.0)
    assert cost_to_reach([1, 3], [0.5, 0.9], 0.4) == pytest.approx(1.0)
    assert cost_to_reach([1, 3], [0.5, 0.9], 0.95) is None


def test_bootstrap_gain_of_a_router_against_itself_is_zero():
    rng = np.random.default_rng(0)
    curve = (rng.random((4, 50)), rng.random((4, 50)))
    single = rng.random((3, 50))
    gain = bootstrap_gain(curve, curve, single, samples=50)
    assert gain == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_bootstrap_gain_detects_a_uniformly_better_router():
    rng = np.random.default_rng(1)
    costs = np.sort(rng.random((4, 200)), axis=0)
    worse = rng.random((4, 200)) * 0.5
    gain = bootstrap_gain((costs, worse + 0.3), (costs, worse), costs[[0, -1]], samples=100)
    assert gain["low"] > 0.2


def test_cost_to_reach_tolerates_float_sums_of_the_same_quality():
    quality = 1 - 0.9  # 0.09999999999999998: the same quality as 0.1, summed in another order
    assert cost_to_reach([1.0, 2.0], [0.05, quality], 0.1) == pytest.approx(2.0)
