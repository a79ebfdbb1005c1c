"""The Ranker: the routing decision and a cascade's next step, from one loaded artifact, inside the ingress replica.

A decision is a few matrix products on the artifact, far less work than a hop to another replica, so it runs where
the request is (in a thread, off the event loop). A Ranker is one artifact and what is derived from it, replaced
whole on a live swap: a request holds the Ranker it started with, so its decision and every step of its cascade
come from one artifact, whatever is swapped in meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from serve.app.protocol import NOT_A_CANDIDATE, RankedModel, RoutingDecision
from serve.core.artifact import RouterArtifact
from serve.core.capabilities import Capabilities, Needs, Shortfall, shortfalls
from serve.core.cascade import judged_answers, next_step


@dataclass(frozen=True)
class CascadeVerdict:
    """One step of a request's cascade."""

    next_model: str | None  # the model to ask now; None: stop
    answer: str | None  # the model whose answer is the best so far; None before any answer
    posthoc_quality: dict[str, float]  # each answer obtained, judged against the others


@dataclass(frozen=True)
class Ranker:
    """Ranks the pool with `RouterArtifact.route`, the evaluation's own decision path, leaving out the models that
    cannot serve the request (`serve.core.capabilities.shortfall`: a feature the request needs, a context window too
    small for the prompt and the answer); for cascades, judges the answers obtained and takes the next step with
    `serve.core.cascade.next_step`, the evaluation's and the batch job's."""

    path: str  # as the ingress's `user_config` names it
    artifact: RouterArtifact
    capabilities: list[Capabilities]  # per pool model

    @classmethod
    def load(cls, path: str, backend_capabilities: dict[str, Capabilities]) -> Ranker:
        """The Ranker of the artifact at `path`; `backend_capabilities` holds every model with a backend."""
        artifact = RouterArtifact.load(path)
        return cls(path, artifact, [backend_capabilities.get(model, Capabilities()) for model in artifact.models])

    @property
    def models(self) -> list[str]:
        return self.artifact.models

    @property
    def cascades(self) -> bool:
        """Whether the artifact can judge answers (it has a post-hoc estimator)."""
        return self.artifact.posthoc is not None

    def decide(self, embedding: np.ndarray, prompt_tokens: int, text: str, cost_weight: float, candidates: list[str],
               max_cost: float | None, needs: Needs) -> RoutingDecision:
        started = time.perf_counter()
        candidate, lacking = self._admissible(candidates, needs.with_prompt_tokens(prompt_tokens))
        allowed = candidate & _capable(lacking)
        # When no candidate can serve the request, rank the candidates anyway, so the answer still says what each lacks.
        decision = self.artifact.route(np.asarray(embedding, np.float32)[None, :], [text], np.array([prompt_tokens]), cost_weight,
                                       allowed=allowed if allowed.any() else candidate, cost_cap=max_cost)
        ranking = []
        for index, eligible in zip(decision.order[0], decision.eligible[0]):
            eligible = bool(eligible and allowed[index])
            ranking.append(RankedModel(
                model=self.models[index], predicted_quality=float(decision.quality[0, index]),
                estimated_cost=float(decision.cost[0, index]), eligible=eligible,
                ineligible_because=None if eligible else _why_not(candidate[index], lacking[index])))
        return RoutingDecision(task=int(decision.task[0]), task_probability=float(decision.task_probability[0]),
                               cost_weight=cost_weight, prompt_tokens=int(prompt_tokens), ranking=ranking,
                               decision_ms=(time.perf_counter() - started) * 1e3)

    def judge(self, decision: RoutingDecision, max_cost: float | None, needs: Needs,
              answers: dict[str, tuple[str, np.ndarray]], unavailable: list[str]) -> CascadeVerdict:
        """The next step of a request's cascade: `decision` is its routing decision by this Ranker (the ex-ante
        estimates and costs, among the candidates it was asked to choose from), `answers` model -> (answer text,
        embedding of its opening) the answers obtained so far, and `unavailable` the models whose backends failed."""
        models = self.models
        by_model = {entry.model: entry for entry in decision.ranking}
        ex_ante = np.array([[by_model[model].predicted_quality for model in models]])
        cost = np.array([[by_model[model].estimated_cost for model in models]])
        responses = np.array([[answers[model][0] if model in answers else "" for model in models]], dtype=object)
        embeddings = np.zeros((1, len(models), self.artifact.embedding_dimension), np.float32)
        for index, model in enumerate(models):
            if model in answers:
                embeddings[0, index] = answers[model][1]
        ran = np.isin(models, list(answers))[None]
        candidate, lacking = self._admissible(decision.candidates(), needs.with_prompt_tokens(decision.prompt_tokens))
        allowed = candidate & _capable(lacking) & ~np.isin(models, unavailable)
        judgement = next_step(self.artifact.posthoc, ex_ante, cost, ran, *judged_answers(responses, embeddings), decision.cost_weight,
                              self.artifact.cost_scale, allowed=allowed[None], cost_cap=max_cost)
        step = judgement.step
        return CascadeVerdict(
            next_model=models[step.next_model[0]] if step.next_model[0] >= 0 else None,
            answer=models[step.answer[0]] if step.answer[0] >= 0 else None,
            posthoc_quality={model: float(judgement.quality[0, index]) for index, model in enumerate(models) if model in answers})

    def _admissible(self, candidates: list[str], needs: Needs) -> tuple[np.ndarray, list[Shortfall | None]]:
        """[M] bool: among the request's candidates; and what keeps each model from serving it (None: nothing)."""
        return np.isin(self.models, candidates), shortfalls(self.capabilities, needs)


def _capable(lacking: list[Shortfall | None]) -> np.ndarray:
    return np.array([reason is None for reason in lacking], bool)


def _why_not(candidate: bool, lacking: Shortfall | None) -> str:
    if not candidate:
        return NOT_A_CANDIDATE
    return lacking.reason if lacking is not None else "over max_cost"
