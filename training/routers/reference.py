"""The reference points of every results table: fixed choices, the zero router and the oracle. Nothing is
learned (one curve a fold, no seeds); all but the oracle are baselines a learned router must beat."""

from __future__ import annotations

import numpy as np

from training.datasets import RoutingTable
from training.metrics import trace_curve
from training.routers.base import Curve, Router


def _fixed_choice(table: RoutingTable, model: int) -> Curve:
    return table.costs[:, model][None, :], table.scores[:, model][None, :]


class ReferenceRouter(Router):
    """A reference point: its curve follows from the training and test tables alone."""

    learned = False
    baseline = True

    @classmethod
    def fit(cls, train, seed):
        return cls()


class RandomChoice(ReferenceRouter):
    """`random`: a uniformly random model per prompt, in expectation (no sampling noise)."""

    def curve(self, train, test):
        return test.table.costs.mean(axis=1)[None, :], test.table.scores.mean(axis=1)[None, :]


class CheapestModel(ReferenceRouter):
    """`cheapest`: the model with the lowest mean training cost."""

    def curve(self, train, test):
        return _fixed_choice(test.table, int(np.argmin(train.table.costs.mean(axis=0))))


class BestSingleModel(ReferenceRouter):
    """`best_single`: the model with the best mean training score (ties to the cheaper)."""

    def curve(self, train, test):
        means = train.table.scores.mean(axis=0)
        best = np.flatnonzero(means == means.max())
        return _fixed_choice(test.table, int(best[np.argmin(train.table.costs.mean(axis=0)[best])]))


class ZeroRouter(ReferenceRouter):
    """`zero_router`: every single model as an operating point; its hull is the zero router."""

    def curve(self, train, test):
        return test.table.costs.T.copy(), test.table.scores.T.copy()


class Oracle(ReferenceRouter):
    """`oracle`: knows every test score and every true cost: the upper bound of routing."""

    baseline = False

    def curve(self, train, test):
        table = test.table
        return trace_curve(table.scores, table.costs, table.scores, table.costs, train.cost_scale)
