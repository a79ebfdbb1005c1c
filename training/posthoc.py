"""Fitting the post-hoc estimator (`serve.core.posthoc.PostHocEstimator`, which serving owns for inference).

Two stages, so that each is fitted on data it can trust:
1. on the fit part of the training rows, per model, a logistic regression on what the answer says about itself
   (its embedding, its length, format checks);
2. on a validation slice, one logistic regression that combines that answer score with the ex-ante estimate
   (the prompt-only router's prediction, honest on that slice) and with the answer's agreement with the answers
   already obtained, plus a per-model intercept. Its rows pair each answer with random sets of other answers
   seen before it, as a cascade meets them. Being a regression on the slice, it is also the calibration.

NumPy only, no Ray: a few small regressions, fitted in the fit process itself.
"""

from __future__ import annotations

import numpy as np

from serve.core.answer_facts import AnswerFacts, agreement
from serve.core.posthoc import (
    FEATURE_GROUPS,
    PostHocEstimator,
    own_features,
    prior_design,
    sigmoid,
)

CONTEXT_SIZES = (0, 1, 2, 3)  # other answers seen, in the stage 2 rows
ANSWER_L2 = 10.0  # stage 1 ridge penalty (on the sum, not the mean, of the log losses over a model's answers)
COMBINE_L2 = 1.0


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 30) -> np.ndarray:
    """Weights [D + 1] (the last is the unpenalised bias) of an L2-penalised logistic regression on soft
    labels `y` in [0, 1], by Newton's method."""
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    weights = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = sigmoid(design @ weights)
        gradient = design.T @ (p - y) + penalty * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-8:
            break
    return weights


def fit_posthoc(fit_facts: AnswerFacts, fit_scores: np.ndarray, calibration_facts: AnswerFacts, calibration_scores: np.ndarray,
                calibration_ex_ante: np.ndarray, groups: tuple[str, ...] = FEATURE_GROUPS, seed: int = 0) -> PostHocEstimator:
    """Stage 1 on the fit rows, stage 2 and the resolution on the calibration rows (see the module)."""
    unknown = set(groups) - set(FEATURE_GROUPS)
    if unknown:
        raise ValueError(f"unknown feature groups {sorted(unknown)}: use {FEATURE_GROUPS}")
    own = own_features(fit_facts, groups)
    mean, std = own.mean(axis=(0, 1)), own.std(axis=(0, 1)) + 1e-6
    models = fit_scores.shape[1]
    if own.shape[-1]:
        x = (own - mean) / std
        answer_weights = np.stack([fit_logistic(x[:, j], fit_scores[:, j], ANSWER_L2) for j in range(models)])
    else:
        answer_weights = np.zeros((models, 1))
    estimator = PostHocEstimator(tuple(groups), answer_weights, mean, std, np.zeros(0), np.zeros(models), np.zeros(0))

    rng = np.random.default_rng(seed)
    agree = agreement(calibration_facts)
    answer_scores = estimator.answer_scores(calibration_facts)
    n = len(calibration_scores)
    designs, targets, seen_counts = [], [], []
    for size in CONTEXT_SIZES:
        seen = np.argsort(rng.random((n, models)), axis=1) < size  # a random set of `size` answers per prompt
        designs.append(estimator.design(answer_scores, calibration_facts, agree, seen, calibration_ex_ante).reshape(n * models, -1))
        targets.append(calibration_scores.reshape(-1))
        seen_counts.append(size - seen)  # other answers seen by each judged answer
    design, target = np.concatenate(designs), np.concatenate(targets)
    estimator.combine_weights = fit_logistic(design, target, COMBINE_L2)
    posthoc = sigmoid(design @ estimator.combine_weights[:-1] + estimator.combine_weights[-1]).reshape(-1, models)
    estimator.prior_weights = fit_logistic(prior_design(calibration_ex_ante).reshape(n * models, -1), calibration_scores.reshape(-1), COMBINE_L2)
    prior = np.tile(estimator.calibrated_ex_ante(calibration_ex_ante), (len(CONTEXT_SIZES), 1))
    counts = np.concatenate(seen_counts)
    moved, spread = (posthoc - prior) ** 2, prior * (1 - prior)
    estimator.resolution = np.stack([
        np.sqrt(np.clip((moved * (counts == s)).sum(axis=0) / np.maximum((spread * (counts == s)).sum(axis=0), 1e-9), 0.0, 1.0))
        for s in range(max(CONTEXT_SIZES) + 1)
    ], axis=1)
    return estimator
