"""Cascades as the evaluation runs them: several models may answer one prompt, and the prompt costs the sum.

- `cascade`: cascade routing (`serve.core.decision.cascade_step`) on FineRouter's ex-ante estimates and the
  post-hoc estimator's judgement of every answer obtained (`serve.core.posthoc`, fitted by `training.posthoc`), played
  by `serve.core.cascade.play_cascade`, the loop the batch job runs.
- `agreement_cascade`: a fixed chain of cheaper models all answer; if they agree the first one's answer
  stands, else the dearest model answers. Nothing is fitted, so the chain is chosen on the whole training
  fold, one per cost weight.
- `frugal_cascade` (FrugalGPT): a fixed chain run in order of cost until the scorer (the post-hoc estimator
  without agreement: this answer alone) clears the step's threshold. Chain and thresholds are chosen per cost
  weight on the validation slice.

Each yields the per-prompt curve the harness scores (`Router.curve`): at each cost weight, the true total cost
and the score of the answer returned.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, replace

import numpy as np

from serve.core.answer_facts import AnswerFacts, agreement
from serve.core.artifact import RouterArtifact
from serve.core.cascade import play_cascade
from serve.core.decision import CASCADE_DEPTH
from serve.core.posthoc import PostHocEstimator
from training.fit import FitConfig, fit_router
from training.metrics import COST_WEIGHTS, curve_aiq
from training.posthoc import fit_posthoc
from training.routers.base import Curve, Router, TrainingSet
from training.routers.finerouter import evaluation_fit

# Agreement on free text: the cosine of two answers' embeddings at or above this (chosen on the training fold).
TEXT_AGREEMENT_THRESHOLDS = (0.85, 0.9, 0.95, 0.98)
SCORER_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# The post-hoc features kept: the answer's embedding, length and format checks
# (`serve.core.posthoc.FEATURE_GROUPS`) did not earn their place on held-out validation
# (benchmarks/posthoc_features.py, docs/evaluation.md).
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


class RecordedAnswers:
    """The evaluation's answer source for `serve.core.cascade.play_cascade`: every answer is recorded, so every call
    succeeds and costs what the data says."""

    def __init__(self, facts: AnswerFacts, costs: np.ndarray):
        self.facts, self.agree, self.costs = facts, agreement(facts), costs

    def obtain(self, rows, models):
        return np.ones(len(rows), bool), self.costs[rows, models]

    def judged(self, rows):
        return self.facts.subset(rows), self.agree[rows]


def run_cascade(ex_ante, estimated_cost, data: TrainingSet, estimator: PostHocEstimator, cost_weight: float, cost_scale: float,
                max_depth: int = CASCADE_DEPTH) -> CascadeOutcome:
    """Play cascade routing on recorded answers, as the batch job and the Ranker play it on live ones: at each
    step the decision rule sees the (calibrated) ex-ante estimates of the models not run, the post-hoc estimates
    of those run (each judged against the others run), the estimated costs of the former and the true costs of
    the latter."""
    table = data.table
    play = play_cascade(estimator, ex_ante, estimated_cost, RecordedAnswers(data.answers, table.costs), cost_weight, cost_scale,
                        max_depth=max_depth)
    rows = np.arange(len(table))
    return CascadeOutcome(play.runs, play.answer, table.scores[rows, play.answer], (table.costs * play.ran).sum(axis=1))


def _curve(outcomes: list[tuple[np.ndarray, np.ndarray]]) -> Curve:
    return np.stack([c for c, _ in outcomes]), np.stack([q for _, q in outcomes])


def fit_cascade_estimator(artifact: RouterArtifact, data: TrainingSet, seed: int, groups: tuple[str, ...] = DEFAULT_GROUPS,
                          validation_fraction: float = 0.2) -> tuple[PostHocEstimator, float]:
    """The post-hoc estimator of a router fitted on `data` with this seed (`training.fit.fit_router`): its answer
    model on the router's fit rows, its combination, calibration and resolution scale on the router's validation
    slice (where the router's predictions are honest: that slice only chose its settings). Returns the estimator,
    its resolutions scaled, and the scale."""
    fit, calibration = data.validation_split(seed, validation_fraction)
    estimator = fit_posthoc(fit.answers, fit.table.scores, calibration.answers, calibration.table.scores,
                            artifact.predict(calibration.embeddings, calibration.table.prompts)[0], groups, seed)
    scale = _resolution_scale(artifact, estimator, calibration)
    return replace(estimator, resolution=estimator.resolution * scale), scale


def fit_with_cascades(data: TrainingSet, config: FitConfig, log=print) -> RouterArtifact:
    """FineRouter's artifact (`training.fit.fit_router`), with the post-hoc estimator where `data` has answers."""
    artifact = fit_router(data, config, log)
    if data.answers is None:
        return artifact
    estimator, scale = fit_cascade_estimator(artifact, data, config.seed, validation_fraction=config.validation_fraction)
    log(f"post-hoc estimator: features {list(estimator.groups)}, resolution scale {scale} (chosen on validation)")
    return artifact.with_posthoc(estimator, {"resolution_scale": scale})


def _resolution_scale(artifact: RouterArtifact, estimator: PostHocEstimator, calibration: TrainingSet) -> float:
    """The factor on the measured resolutions that gives the best AIQ on the validation slice. The rule takes
    the models' outcomes as independent, while cheap models share their mistakes, so the measured resolutions
    overstate what running several models buys; at 0 the cascade is routing."""
    scores = [curve_aiq(_trace(artifact, replace(estimator, resolution=estimator.resolution * factor), calibration, COST_WEIGHTS[::3]),
                        calibration.table.costs)
              for factor in RESOLUTION_SCALES]
    return RESOLUTION_SCALES[int(np.argmax(scores))]


def _trace(artifact: RouterArtifact, estimator: PostHocEstimator, test: TrainingSet, weights=COST_WEIGHTS) -> Curve:
    """The cascade's curve on `test`'s recorded answers: the artifact's estimates and cost model, this estimator."""
    ex_ante, estimated = artifact.predict(test.embeddings, test.table.prompts)[0], artifact.cost_model.estimate(test.table.prompt_tokens)
    outcomes = [run_cascade(ex_ante, estimated, test, estimator, w, artifact.cost_scale) for w in weights]
    return _curve([(o.cost, o.quality) for o in outcomes])


class CascadeRouter(Router):
    """`cascade`: FineRouter (the harness's own fit on this training set and seed) for the ex-ante estimates, and
    its post-hoc estimator (`fit_cascade_estimator`), as `python -m training fit` stores them in the artifact.
    Without recorded answers there is nothing to judge: it routes on FineRouter's estimates (`finerouter`'s curve)."""

    cascade = True

    def __init__(self, data: TrainingSet, seed: int, groups: tuple[str, ...] = DEFAULT_GROUPS):
        self.artifact = evaluation_fit(data, seed)
        self.estimator = None if data.answers is None else fit_cascade_estimator(self.artifact, data, seed, groups)[0]

    @classmethod
    def fit(cls, train, seed):
        return _cascade_router(train, seed)

    def predict_quality(self, embeddings, prompts):
        """The ex-ante estimates: FineRouter's."""
        return self.artifact.predict(embeddings, prompts)[0]

    def curve(self, train, test):
        if test.answers is None:
            return super().curve(train, test)
        return _trace(self.artifact, self.estimator, test)


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


class AgreementCascade(Router):
    """`agreement_cascade`: single models and chains of 2-3 cheaper models that escalate to the dearest on
    disagreement; per cost weight the best on the training fold."""

    cascade = needs_answers = True

    def __init__(self, data: TrainingSet, seed: int):
        costs = data.table.costs.mean(axis=0)
        self.dearest = int(np.argmax(costs))
        cheaper = [int(j) for j in np.argsort(costs) if j != self.dearest]
        self.policies = [((j,), None) for j in range(len(costs))]
        self.policies += [(chain, t) for chain in _chains(cheaper, (2, 3)) for t in TEXT_AGREEMENT_THRESHOLDS]

    def _outcomes(self, data: TrainingSet):
        agree = agreement(data.answers)
        table = data.table
        return [(table.costs[:, chain[0]], table.scores[:, chain[0]]) if t is None
                else agreement_outcome(chain, self.dearest, t, table, data.answers, agree) for chain, t in self.policies]

    def curve(self, train, test):
        return _fixed_policy_curve(self._outcomes(train), self._outcomes(test), train.cost_scale)


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


class FrugalCascade(Router):
    """`frugal_cascade`: single models and chains of 2-3 models in order of cost, each step with a threshold on
    the scorer; per cost weight the best on the validation slice (the scorer: `cascade`'s post-hoc estimator,
    shared, judging each answer alone)."""

    cascade = needs_answers = True

    def __init__(self, data: TrainingSet, seed: int):
        self.scorer = _cascade_router(data, seed)
        _, self.calibration = data.validation_split(seed)
        costs = data.table.costs.mean(axis=0)
        by_cost = [int(j) for j in np.argsort(costs)]
        self.policies = [((j,), ()) for j in range(len(costs))]
        for chain in _chains(by_cost, (2, 3)):
            self.policies += [(chain, t) for t in itertools.product(SCORER_THRESHOLDS, repeat=len(chain) - 1)]

    def _outcomes(self, data: TrainingSet):
        alone = np.zeros(data.table.scores.shape, bool)
        ex_ante = self.scorer.predict_quality(data.embeddings, data.table.prompts)
        score = self.scorer.estimator.estimate(ex_ante, data.answers, agreement(data.answers), alone)
        return [frugal_outcome(chain, t, data.table, score) for chain, t in self.policies]

    def curve(self, train, test):
        return _fixed_policy_curve(self._outcomes(self.calibration), self._outcomes(test), train.cost_scale)


_cascade_routers: weakref.WeakKeyDictionary[TrainingSet, dict] = weakref.WeakKeyDictionary()


def _cascade_router(data: TrainingSet, seed: int) -> CascadeRouter:
    """One post-hoc estimator per (training set, seed), shared by `cascade` and `frugal_cascade`."""
    cache = _cascade_routers.setdefault(data, {})
    if seed not in cache:
        cache[seed] = CascadeRouter(data, seed)
    return cache[seed]
