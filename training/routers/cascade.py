"""Cascades as the evaluation runs them: several models may answer one prompt, and the prompt costs the sum.

- `cascade`: cascade routing (`serve.decision.cascade_step`) on FineRouter's ex-ante estimates and the
  post-hoc estimator's judgement of every answer obtained (`training.posthoc`).
- `agreement_cascade`: a fixed chain of cheaper models all answer; if they agree the first one's answer
  stands, else the dearest model answers. Nothing is fitted, so the chain is chosen on the whole training
  fold, one per cost weight.
- `frugal_cascade` (FrugalGPT): a fixed chain run in order of cost until the scorer (the post-hoc estimator
  without agreement: this answer alone) clears the step's threshold. Chain and thresholds are chosen per cost
  weight on the validation slice.

Each yields the per-prompt curve the harness scores: at each cost weight, the true total cost and the score of
the answer returned.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from serve.decision import CASCADE_DEPTH, cascade_step
from training.answers import AnswerFacts, agreement
from training.metrics import COST_WEIGHTS, curve_aiq
from training.posthoc import PostHocEstimator
from training.routers.base import TrainingSet
from training.routers.finerouter import evaluation_fit

Curve = tuple[np.ndarray, np.ndarray]
# Agreement on free text: the cosine of two answers' embeddings at or above this (chosen on the training fold).
TEXT_AGREEMENT_THRESHOLDS = (0.85, 0.9, 0.95, 0.98)
SCORER_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# The post-hoc features kept: the answer's embedding, length and format checks
# (`training.posthoc.FEATURE_GROUPS`) did not earn their place on held-out validation
# (benchmarks/posthoc_features.py, README).
DEFAULT_GROUPS = ("agreement", "text_agreement", "ex_ante")
RESOLUTION_SCALES = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


@dataclass
class CascadeOutcome:
    """Per prompt: the models run, in order ([N, depth], -1 past the end), the answer returned, its true
    score and the true total cost."""

    runs: np.ndarray
    answer: np.ndarray
    quality: np.ndarray
    cost: np.ndarray


def run_cascade(ex_ante, estimated_cost, data: TrainingSet, estimator: PostHocEstimator, cost_weight: float, cost_scale: float,
                max_depth: int = CASCADE_DEPTH) -> CascadeOutcome:
    """Play cascade routing on recorded answers: at each step the decision rule sees the (calibrated) ex-ante
    estimates of the models not run, the post-hoc estimates of those run (each judged against the others run), the
    estimated costs of the former and the true costs of the latter. Every prompt still going has run `depth`
    models, so the models it may run next have seen `depth` answers: their resolution is the one for `depth`."""
    table, facts = data.table, data.answers
    n, m = table.scores.shape
    agree = agreement(facts)
    prior = estimator.calibrated_ex_ante(ex_ante)
    ran = np.zeros((n, m), bool)
    runs = np.full((n, max_depth), -1)
    answer = np.full(n, -1)
    active = np.arange(n)  # prompts whose cascade has not stopped
    for depth in range(max_depth + 1):
        posthoc = estimator.estimate(ex_ante[active], facts.subset(active), agree[active], ran[active])
        step = cascade_step(np.where(ran[active], posthoc, prior[active]), np.where(ran[active], table.costs[active], estimated_cost[active]),
                            ran[active], cost_weight, cost_scale, resolution=estimator.resolution[:, min(depth, estimator.resolution.shape[1] - 1)],
                            max_depth=max_depth)
        answer[active] = step.answer
        going = step.next_model >= 0
        active, next_model = active[going], step.next_model[going]
        if not len(active):
            break
        ran[active, next_model] = True
        runs[active, depth] = next_model
    rows = np.arange(n)
    return CascadeOutcome(runs, answer, table.scores[rows, answer], (table.costs * ran).sum(axis=1))


def _curve(outcomes: list[tuple[np.ndarray, np.ndarray]]) -> Curve:
    return np.stack([c for c, _ in outcomes]), np.stack([q for _, q in outcomes])


class CascadeRoutingPolicy:
    """`cascade`: FineRouter (the harness's own fit on this training set and seed) for the ex-ante estimates;
    the post-hoc estimator's answer model fitted on FineRouter's fit rows, its combination and calibration on
    FineRouter's validation slice (where FineRouter's predictions are honest: that slice only chose its
    settings)."""

    def __init__(self, data: TrainingSet, seed: int, groups: tuple[str, ...] = DEFAULT_GROUPS):
        self.artifact = evaluation_fit(data, seed)
        self.cost_model, self.cost_scale = data.cost_model, data.cost_scale
        fit, calibration = data.validation_split(seed)
        self.estimator = PostHocEstimator.fit(fit.answers, fit.table.scores, calibration.answers, calibration.table.scores,
                                              self.ex_ante(calibration), groups, seed)
        self.estimator.resolution = self.estimator.resolution * self._resolution_scale(calibration)

    def _resolution_scale(self, calibration: TrainingSet) -> float:
        """The factor on the measured resolutions that gives the best AIQ on the validation slice. The rule
        takes the models' outcomes as independent, while cheap models share their mistakes, so the measured
        resolutions overstate what running several models buys; at 0 the cascade is routing."""
        measured = self.estimator.resolution
        scores = []
        for factor in RESOLUTION_SCALES:
            self.estimator.resolution = measured * factor
            scores.append(curve_aiq(self.trace(calibration, COST_WEIGHTS[::3]), calibration.table.costs))
        self.estimator.resolution = measured
        return RESOLUTION_SCALES[int(np.argmax(scores))]

    def ex_ante(self, data: TrainingSet) -> np.ndarray:
        return self.artifact.predict(data.embeddings, data.table.prompts)[0]

    def trace(self, test: TrainingSet, weights=COST_WEIGHTS) -> Curve:
        ex_ante, estimated = self.ex_ante(test), self.cost_model.estimate(test.table.prompt_tokens)
        outcomes = [run_cascade(ex_ante, estimated, test, self.estimator, w, self.cost_scale) for w in weights]
        return _curve([(o.cost, o.quality) for o in outcomes])


def _fixed_policy_curve(outcomes_fit: list[tuple[np.ndarray, np.ndarray]], outcomes_test: list[tuple[np.ndarray, np.ndarray]],
                        cost_scale: float, weights=COST_WEIGHTS) -> Curve:
    """At each cost weight, the fixed policy (one of a list) with the best mean quality - weight x mean cost /
    cost_scale where it was chosen, played on the test prompts."""
    utility_terms = np.array([(q.mean(), c.mean()) for c, q in outcomes_fit])
    picks = [int(np.argmax(utility_terms[:, 0] - w * utility_terms[:, 1] / cost_scale)) for w in weights]
    return _curve([outcomes_test[p] for p in picks])


def _chains(models_by_cost: list[int], sizes) -> list[tuple[int, ...]]:
    """Chains of the given sizes, each in order of cost."""
    return [chain for size in sizes for chain in itertools.combinations(models_by_cost, size)]


def agreement_outcome(chain: tuple[int, ...], dearest: int, threshold: float, table, facts: AnswerFacts, agree: np.ndarray):
    """(cost, quality) per prompt of: every model of `chain` answers; if all pairs agree (equal letters, or
    text cosine >= threshold) the first answer stands, else `dearest` answers too and its answer stands."""
    chain = list(chain)
    named = np.not_equal(facts.letters[:, chain], None)
    pairs = agree[:, chain][:, :, chain]
    both_named = named[:, :, None] & named[:, None, :]
    agreeing = np.where(both_named, pairs >= 1.0, pairs >= threshold).all(axis=(1, 2))
    cost = table.costs[:, chain].sum(axis=1) + np.where(agreeing, 0.0, table.costs[:, dearest])
    quality = np.where(agreeing, table.scores[:, chain[0]], table.scores[:, dearest])
    return cost, quality


class AgreementCascade:
    """`agreement_cascade`: single models and chains of 2-3 cheaper models that escalate to the dearest on
    disagreement; per cost weight the best on the training fold."""

    def __init__(self, data: TrainingSet, seed: int):
        costs = data.table.costs.mean(axis=0)
        self.dearest = int(np.argmax(costs))
        cheaper = [int(j) for j in np.argsort(costs) if j != self.dearest]
        self.policies = [((j,), None) for j in range(len(costs))]
        self.policies += [(chain, t) for chain in _chains(cheaper, (2, 3)) for t in TEXT_AGREEMENT_THRESHOLDS]
        self.fold, self.cost_scale = data, data.cost_scale

    def _outcomes(self, data: TrainingSet):
        agree = agreement(data.answers)
        table = data.table
        return [(table.costs[:, chain[0]], table.scores[:, chain[0]]) if t is None
                else agreement_outcome(chain, self.dearest, t, table, data.answers, agree) for chain, t in self.policies]

    def trace(self, test: TrainingSet, weights=COST_WEIGHTS) -> Curve:
        return _fixed_policy_curve(self._outcomes(self.fold), self._outcomes(test), self.cost_scale, weights)


def frugal_outcome(chain: tuple[int, ...], thresholds: tuple[float, ...], table, score: np.ndarray):
    """(cost, quality) per prompt of running `chain` in order until a model's answer scores >= its step's
    threshold (the last model's answer stands regardless)."""
    n = len(table.scores)
    done = np.zeros(n, bool)
    cost, quality = np.zeros(n), np.zeros(n)
    for step, model in enumerate(chain):
        cost += np.where(done, 0.0, table.costs[:, model])
        accept = ~done & ((score[:, model] >= thresholds[step]) if step < len(chain) - 1 else True)
        quality = np.where(accept, table.scores[:, model], quality)
        done |= accept
    return cost, quality


class FrugalCascade:
    """`frugal_cascade`: single models and chains of 2-3 models in order of cost, each step with a threshold on
    the scorer; per cost weight the best on the validation slice (the scorer: `cascade`'s post-hoc estimator,
    shared, judging each answer alone)."""

    def __init__(self, data: TrainingSet, seed: int):
        self.policy = _cascade_policy(data, seed)
        _, self.calibration = data.validation_split(seed)
        costs = data.table.costs.mean(axis=0)
        by_cost = [int(j) for j in np.argsort(costs)]
        self.policies = [((j,), ()) for j in range(len(costs))]
        for chain in _chains(by_cost, (2, 3)):
            self.policies += [(chain, t) for t in itertools.product(SCORER_THRESHOLDS, repeat=len(chain) - 1)]
        self.cost_scale = data.cost_scale

    def _outcomes(self, data: TrainingSet):
        alone = np.zeros(data.table.scores.shape, bool)
        score = self.policy.estimator.estimate(self.policy.ex_ante(data), data.answers, agreement(data.answers), alone)
        return [frugal_outcome(chain, t, data.table, score) for chain, t in self.policies]

    def trace(self, test: TrainingSet, weights=COST_WEIGHTS) -> Curve:
        return _fixed_policy_curve(self._outcomes(self.calibration), self._outcomes(test), self.cost_scale, weights)


_policies: weakref.WeakKeyDictionary[TrainingSet, dict] = weakref.WeakKeyDictionary()


def _cascade_policy(data: TrainingSet, seed: int) -> CascadeRoutingPolicy:
    """One post-hoc estimator per (training set, seed), shared by `cascade` and `frugal_cascade`."""
    cache = _policies.setdefault(data, {})
    if seed not in cache:
        cache[seed] = CascadeRoutingPolicy(data, seed)
    return cache[seed]


# name -> builder(training set with answers, seed) -> an object whose trace(test set) is the router's curve.
CASCADE_ROUTERS: dict[str, Callable[[TrainingSet, int], object]] = {
    "cascade": _cascade_policy,
    "agreement_cascade": AgreementCascade,
    "frugal_cascade": FrugalCascade,
}
