"""Cascade routing on answers: the one step (judge the answers obtained, then `serve.core.decision.cascade_step`), and
the loop that plays it for many prompts at once.

The Ranker deployment takes one request's step at a time (the ingress obtains each answer in between); the batch
job and the evaluation play many prompts with `play_cascade`, the batch job on answers it asks an endpoint for,
the evaluation on recorded ones. All of them decide with `next_step`, so what is evaluated is what is served.
NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serve.core.answer_facts import AnswerFacts, agreement
from serve.core.decision import CASCADE_DEPTH, CascadeStep, cascade_step
from serve.core.posthoc import PostHocEstimator


@dataclass(frozen=True)
class Judgement:
    """One step for N prompts, and the qualities it compared: [N, M] the post-hoc estimate of each model run,
    the calibrated ex-ante estimate of the others."""

    step: CascadeStep
    quality: np.ndarray


def next_step(estimator: PostHocEstimator, ex_ante: np.ndarray, cost: np.ndarray, ran: np.ndarray, facts: AnswerFacts,
              agree: np.ndarray, cost_weight: float, cost_scale: float, *, allowed: np.ndarray | None = None,
              cost_cap: float | None = None, max_depth: int = CASCADE_DEPTH) -> Judgement:
    """Judge every answer obtained (`ran` [N, M]) against the others obtained, then stop or pick the next model.

    ex_ante: [N, M] the router's quality estimates from the prompt. cost: [N, M] USD, spent for the models run,
    estimated for the others. facts, agree: the answers' facts and pairwise agreement (`serve.core.answer_facts`),
    read only where `ran`. allowed: [N, M] the models that may still run (the request's candidates, less any
    whose backend failed); a prompt with none left stops with the best answer it has (-1 if none).
    """
    # In float64 whatever the caller holds (the artifact predicts in float32, a request carries float64), so that
    # every caller judges the same numbers the same way.
    ex_ante, cost, ran = np.asarray(ex_ante, float), np.asarray(cost, float), np.asarray(ran, bool)
    quality = np.where(ran, estimator.estimate(ex_ante, facts, agree, ran), estimator.calibrated_ex_ante(ex_ante))
    allowed = np.broadcast_to(True if allowed is None else np.asarray(allowed, bool), ran.shape)
    open_rows = allowed.any(axis=1)
    next_model = np.full(len(ran), -1)
    answer = np.where(ran.any(axis=1), np.argmax(np.where(ran, quality, -np.inf), axis=1), -1)
    if open_rows.any():
        step = cascade_step(quality[open_rows], cost[open_rows], ran[open_rows], cost_weight, cost_scale,
                            resolution=estimator.resolution_after(ran[open_rows].sum(axis=1)), allowed=allowed[open_rows],
                            cost_cap=cost_cap, max_depth=max_depth)
        next_model[open_rows] = step.next_model
    return Judgement(CascadeStep(next_model=next_model, answer=answer), quality)


def judged_answers(responses: np.ndarray, embeddings: np.ndarray) -> tuple[AnswerFacts, np.ndarray]:
    """The facts and pairwise agreement of answers obtained so far: `responses` [N, M] text ("" where none yet),
    `embeddings` [N, M, D] of their openings (`serve.core.answer_facts.answer_opening`; zeros where none)."""
    facts = AnswerFacts.of(responses, embeddings)
    return facts, agreement(facts)


class AnswerSource(Protocol):
    """Where `play_cascade` gets the models' answers: recorded ones (the evaluation), or an endpoint (the batch)."""

    def obtain(self, rows: np.ndarray, models: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Get model `models[i]`'s answer to prompt `rows[i]`: ([K] bool, whether it came; [K] its cost in USD)."""

    def judged(self, rows: np.ndarray) -> tuple[AnswerFacts, np.ndarray]:
        """The facts [K, M] and the agreement [K, M, M] of the answers obtained for `rows` (anything where none)."""


@dataclass
class CascadePlay:
    """Per prompt: the models run, in order ([N, depth], -1 past the end), the model whose answer is returned
    (-1 where no answer came), the qualities the last step compared [N, M], which models ran [N, M], and the
    cost [N, M] (spent where run, estimated elsewhere)."""

    runs: np.ndarray
    answer: np.ndarray
    quality: np.ndarray
    ran: np.ndarray
    cost: np.ndarray


def play_cascade(estimator: PostHocEstimator, ex_ante: np.ndarray, estimated_cost: np.ndarray, source: AnswerSource,
                 cost_weight: float, cost_scale: float, *, allowed: np.ndarray | None = None, cost_cap: float | None = None,
                 max_depth: int = CASCADE_DEPTH) -> CascadePlay:
    """Cascade routing for N prompts at once: each round, `next_step` on every prompt still going, then the
    answers of the models it chose; a model whose answer does not come is not asked again for that prompt."""
    n, m = ex_ante.shape
    ran, cost = np.zeros((n, m), bool), np.array(estimated_cost, float)
    allowed = np.array(np.broadcast_to(True if allowed is None else allowed, (n, m)), bool)
    runs, answer, quality = np.full((n, max_depth), -1), np.full(n, -1), np.zeros((n, m))
    active = np.arange(n)  # prompts whose cascade has not stopped
    while len(active):
        facts, agree = source.judged(active)
        judgement = next_step(estimator, ex_ante[active], cost[active], ran[active], facts, agree, cost_weight, cost_scale,
                              allowed=allowed[active], cost_cap=cost_cap, max_depth=max_depth)
        answer[active], quality[active] = judgement.step.answer, judgement.quality
        going = judgement.step.next_model >= 0
        active, chosen = active[going], judgement.step.next_model[going]
        if not len(active):
            break
        obtained, spent = source.obtain(active, chosen)
        allowed[active[~obtained], chosen[~obtained]] = False
        rows, models = active[obtained], chosen[obtained]
        runs[rows, ran[rows].sum(axis=1)] = models
        ran[rows, models], cost[rows, models] = True, spent[obtained]
    return CascadePlay(runs, answer, quality, ran, cost)
