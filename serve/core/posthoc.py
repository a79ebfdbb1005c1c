"""Post-hoc quality at inference: P(an answer is correct | the prompt, this model's answer, the answers already seen).

Two stages (fitted by `training.posthoc`, each on data it can trust):
1. per model, a logistic regression on what the answer says about itself (its embedding, its length, format
   checks);
2. one logistic regression that combines that answer score with the ex-ante estimate (the prompt-only router's
   prediction) and with the answer's agreement with the answers already obtained, plus a per-model intercept.
Serving owns the inference, so the evaluation, the batch job and the Ranker judge answers with the same code.
NumPy only: a few small matrix products per prompt, cheap beside the answers it judges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve.core.answer_facts import AnswerFacts

# The feature groups; `benchmarks/posthoc_features.py` measures what each adds on held-out validation.
FEATURE_GROUPS = ("embedding", "length", "format", "agreement", "text_agreement", "ex_ante")
# The estimator's arrays, as the router artifact stores them.
ESTIMATOR_ARRAYS = ("answer_weights", "own_mean", "own_std", "combine_weights", "resolution", "prior_weights")


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35, 35)))


def logit(p):
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def prior_design(ex_ante: np.ndarray) -> np.ndarray:
    """[N, M, M + 1] per-model intercepts and the ex-ante logit."""
    n, m = ex_ante.shape
    return np.concatenate([np.broadcast_to(np.eye(m), (n, m, m)), logit(ex_ante)[..., None]], axis=-1)


def own_features(facts: AnswerFacts, groups: tuple[str, ...]) -> np.ndarray:
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


def context_features(facts: AnswerFacts, agree: np.ndarray, seen: np.ndarray, ex_ante: np.ndarray, text: bool) -> np.ndarray:
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
    def has_answer_score(self) -> bool:
        return self.answer_weights.shape[1] > 1

    def answer_scores(self, facts: AnswerFacts) -> np.ndarray:
        """[N, M] stage 1 logits."""
        x = (own_features(facts, self.groups) - self.own_mean) / self.own_std
        return np.einsum("nmf,mf->nm", x, self.answer_weights[:, :-1]) + self.answer_weights[:, -1]

    def design(self, answer_scores, facts, agree, seen, ex_ante) -> np.ndarray:
        """[N, M, G] stage 2 inputs."""
        n, m = seen.shape
        parts = [np.broadcast_to(np.eye(m), (n, m, m))]  # per-model intercepts
        if self.has_answer_score:
            parts.append(answer_scores[..., None])
        if "ex_ante" in self.groups:
            parts.append(logit(ex_ante)[..., None])
        if "agreement" in self.groups:
            parts.append(context_features(facts, agree, seen, ex_ante, text="text_agreement" in self.groups))
        return np.concatenate(parts, axis=-1)

    def calibrated_ex_ante(self, ex_ante: np.ndarray) -> np.ndarray:
        """[N, M] the ex-ante estimate on the post-hoc estimate's scale, for the models not yet run: the decision
        rule compares the two, so both must be calibrated on the same slice."""
        return sigmoid(prior_design(ex_ante) @ self.prior_weights[:-1] + self.prior_weights[-1])

    def estimate(self, ex_ante: np.ndarray, facts: AnswerFacts, agree: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """[N, M] the post-hoc quality of every model's answer, judged against the other answers in `seen`
        [N, M] bool (meaningful for the models whose answers were obtained)."""
        design = self.design(self.answer_scores(facts), facts, agree, seen, ex_ante)
        return sigmoid(design @ self.combine_weights[:-1] + self.combine_weights[-1])

    def resolution_after(self, answers_seen: np.ndarray) -> np.ndarray:
        """[N, M] each model's resolution for prompts that have `answers_seen` [N] answers so far (the last
        measured count stands for any more)."""
        return self.resolution[:, np.minimum(answers_seen, self.resolution.shape[1] - 1)].T

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ESTIMATOR_ARRAYS}
