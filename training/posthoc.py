"""Post-hoc quality: P(an answer is correct | the prompt, this model's answer, the answers already seen).

Two stages, so that each is fitted on data it can trust:
1. on the fit part of the training rows, per model, a logistic regression on what the answer says about itself
   (its embedding, its length, format checks);
2. on a validation slice, one logistic regression that combines that answer score with the ex-ante estimate
   (the prompt-only router's prediction, honest on that slice) and with the answer's agreement with the answers
   already obtained, plus a per-model intercept. Its rows pair each answer with random sets of other answers
   seen before it, as a cascade meets them. Being a regression on the slice, it is also the calibration.

NumPy only, no Ray: fitting takes a second, estimating milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.answers import AnswerFacts, agreement

# The feature groups; `benchmarks/posthoc_features.py` measures what each adds on held-out validation.
FEATURE_GROUPS = ("embedding", "length", "format", "agreement", "text_agreement", "ex_ante")
OWN_GROUPS = ("embedding", "length", "format")  # what an answer says about itself (stage 1)
CONTEXT_SIZES = (0, 1, 2, 3)  # other answers seen, in the stage 2 rows
ANSWER_L2 = 10.0  # stage 1 ridge penalty (on a sum of log losses over ~2,000 answers per model)
COMBINE_L2 = 1.0


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 30) -> np.ndarray:
    """Weights [D + 1] (the last is the unpenalised bias) of an L2-penalised logistic regression on soft
    labels `y` in [0, 1], by Newton's method."""
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    weights = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = _sigmoid(design @ weights)
        gradient = design.T @ (p - y) + penalty * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-8:
            break
    return weights


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35, 35)))


def _logit(p):
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _prior_design(ex_ante: np.ndarray) -> np.ndarray:
    """[N, M, M + 1] per-model intercepts and the ex-ante logit."""
    n, m = ex_ante.shape
    return np.concatenate([np.broadcast_to(np.eye(m), (n, m, m)), _logit(ex_ante)[..., None]], axis=-1)


def _own_features(facts: AnswerFacts, groups: tuple[str, ...]) -> np.ndarray:
    """[N, M, F] what each answer says about itself."""
    parts = []
    if "embedding" in groups:
        parts.append(facts.embeddings.astype(float))
    if "length" in groups:
        parts.append(facts.log_length[..., None])
    if "format" in groups:
        named = np.not_equal(facts.letters, None).astype(float)
        parts.append(np.stack([named, facts.has_code, facts.code_parses, facts.refusal], axis=-1))
    n, m = facts.letters.shape
    return np.concatenate(parts, axis=-1) if parts else np.zeros((n, m, 0))


def _context_features(facts: AnswerFacts, agree: np.ndarray, seen: np.ndarray, ex_ante: np.ndarray, text: bool) -> np.ndarray:
    """[N, M, F] each answer against the answers in `seen` [N, M] (itself excluded): whether any was seen, and
    the mean agreement with the seen answers of models stronger, and of models no stronger, by ex-ante quality
    (a strong model that disagrees says more than a weak one: cheap models share their mistakes), where both
    answers name a choice letter and, with `text`, elsewhere (embedding cosine); each with an indicator."""
    m = seen.shape[1]
    others = seen[:, None, :] & ~np.eye(m, dtype=bool)[None]  # [N, M (judged), M (seen)]
    named = np.not_equal(facts.letters, None)
    letter_pair = named[:, :, None] & named[:, None, :]
    stronger = ex_ante[:, None, :] > ex_ante[:, :, None]
    features = [others.any(axis=2).astype(float)]
    for strength in (stronger, ~stronger):
        for kind in (letter_pair, ~letter_pair) if text else (letter_pair,):
            mask = others & strength & kind
            count = mask.sum(axis=2)
            features += [np.where(count > 0, (agree * mask).sum(axis=2) / np.maximum(count, 1), 0.0), (count > 0).astype(float)]
    return np.stack(features, axis=-1)


@dataclass
class PostHocEstimator:
    groups: tuple[str, ...]
    answer_weights: np.ndarray  # [M, F + 1] stage 1, per model (F = 0: no answer score)
    own_mean: np.ndarray  # [F] standardisation of the stage 1 inputs
    own_std: np.ndarray
    combine_weights: np.ndarray  # stage 2
    resolution: np.ndarray  # [M, S] how far seeing an answer moves the estimate when s = 0.. S-1 other answers were seen
    prior_weights: np.ndarray  # [M + 2] the ex-ante estimate's calibration on the same slice (intercepts, slope, bias)

    @property
    def _has_answer_score(self) -> bool:
        return self.answer_weights.shape[1] > 1

    def _answer_scores(self, facts: AnswerFacts) -> np.ndarray:
        """[N, M] stage 1 logits."""
        x = (_own_features(facts, self.groups) - self.own_mean) / self.own_std
        return np.einsum("nmf,mf->nm", x, self.answer_weights[:, :-1]) + self.answer_weights[:, -1]

    def _design(self, answer_scores, facts, agree, seen, ex_ante) -> np.ndarray:
        """[N, M, G] stage 2 inputs."""
        n, m = seen.shape
        parts = [np.broadcast_to(np.eye(m), (n, m, m))]  # per-model intercepts
        if self._has_answer_score:
            parts.append(answer_scores[..., None])
        if "ex_ante" in self.groups:
            parts.append(_logit(ex_ante)[..., None])
        if "agreement" in self.groups:
            parts.append(_context_features(facts, agree, seen, ex_ante, text="text_agreement" in self.groups))
        return np.concatenate(parts, axis=-1)

    def calibrated_ex_ante(self, ex_ante: np.ndarray) -> np.ndarray:
        """[N, M] the ex-ante estimate on the post-hoc estimate's scale, for the models not yet run: the decision
        rule compares the two, so both must be calibrated on the same slice."""
        return _sigmoid(_prior_design(ex_ante) @ self.prior_weights[:-1] + self.prior_weights[-1])

    def estimate(self, ex_ante: np.ndarray, facts: AnswerFacts, agree: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """[N, M] the post-hoc quality of every model's answer, judged against the other answers in `seen`
        [N, M] bool (meaningful for the models whose answers were obtained)."""
        design = self._design(self._answer_scores(facts), facts, agree, seen, ex_ante)
        return _sigmoid(design @ self.combine_weights[:-1] + self.combine_weights[-1])

    @classmethod
    def fit(cls, fit_facts: AnswerFacts, fit_scores: np.ndarray, calibration_facts: AnswerFacts, calibration_scores: np.ndarray,
            calibration_ex_ante: np.ndarray, groups: tuple[str, ...] = FEATURE_GROUPS, seed: int = 0) -> PostHocEstimator:
        """Stage 1 on the fit rows, stage 2 and the resolution on the calibration rows (see the module)."""
        unknown = set(groups) - set(FEATURE_GROUPS)
        if unknown:
            raise ValueError(f"unknown feature groups {sorted(unknown)}: use {FEATURE_GROUPS}")
        own = _own_features(fit_facts, groups)
        mean, std = own.mean(axis=(0, 1)), own.std(axis=(0, 1)) + 1e-6
        models = fit_scores.shape[1]
        if own.shape[-1]:
            x = (own - mean) / std
            answer_weights = np.stack([fit_logistic(x[:, j], fit_scores[:, j], ANSWER_L2) for j in range(models)])
        else:
            answer_weights = np.zeros((models, 1))
        estimator = cls(groups, answer_weights, mean, std, np.zeros(0), np.zeros(models), np.zeros(0))

        rng = np.random.default_rng(seed)
        agree = agreement(calibration_facts)
        answer_scores = estimator._answer_scores(calibration_facts)
        n = len(calibration_scores)
        designs, targets, seen_counts = [], [], []
        for size in CONTEXT_SIZES:
            seen = np.argsort(rng.random((n, models)), axis=1) < size  # a random set of `size` answers per prompt
            designs.append(estimator._design(answer_scores, calibration_facts, agree, seen, calibration_ex_ante).reshape(n * models, -1))
            targets.append(calibration_scores.reshape(-1))
            seen_counts.append(size - seen)  # other answers seen by each judged answer
        design, target = np.concatenate(designs), np.concatenate(targets)
        estimator.combine_weights = fit_logistic(design, target, COMBINE_L2)
        posthoc = _sigmoid(design @ estimator.combine_weights[:-1] + estimator.combine_weights[-1]).reshape(-1, models)
        estimator.prior_weights = fit_logistic(_prior_design(calibration_ex_ante).reshape(n * models, -1), calibration_scores.reshape(-1), COMBINE_L2)
        prior = np.tile(estimator.calibrated_ex_ante(calibration_ex_ante), (len(CONTEXT_SIZES), 1))
        counts = np.concatenate(seen_counts)
        moved, spread = (posthoc - prior) ** 2, prior * (1 - prior)
        estimator.resolution = np.stack([
            np.sqrt(np.clip((moved * (counts == s)).sum(axis=0) / np.maximum((spread * (counts == s)).sum(axis=0), 1e-9), 0.0, 1.0))
            for s in range(max(CONTEXT_SIZES) + 1)
        ], axis=1)
        return estimator
