"""The Embedder and Ranker deployments: the two steps of a routing decision.

They are separate so that each scales on its own: the encoder is the expensive, batchable part (and the one
that wants a GPU), the decision is a few matrix products on the artifact. Both do their work in a thread, so
that a long prompt never holds up the replica's event loop (and with it every other request on the replica).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from ray import serve
from ray.serve.metrics import Histogram

from serve.app.app_config import EmbedderConfig
from serve.app.protocol import NOT_A_CANDIDATE, RankedModel, RoutingDecision
from serve.core.artifact import RouterArtifact
from serve.core.capabilities import Capabilities, Needs, Shortfall, shortfalls
from serve.core.cascade import judged_answers, next_step
from serve.core.encoder import count_tokens, encode, load_encoder
from serve.core.features import WINDOW_CHARS
from serve.core.posthoc import PostHocEstimator


@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, max_queued_requests=32)
class Embedder:
    """Prompt -> (embedding, prompt tokens), with the same encoder and token counts as training.

    The encoder reads the first few hundred tokens only, so it is given the first WINDOW_CHARS characters:
    the same embedding for any prompt whose first WINDOW_CHARS characters hold that many tokens, and a bounded
    cost for a prompt of any size. The token count (for the cost estimate) covers the whole prompt."""

    def __init__(self, embedder: str, config: EmbedderConfig):
        self.name = embedder
        self.encoder = load_encoder(embedder, device=config.device)
        count_tokens(["warm-up"], embedder)  # load the tokenizer now, not on the first request
        self.embed.set_max_batch_size(config.max_batch_size)
        self.embed.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch
    async def embed(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        # In a thread, so that the replica keeps queueing the next batch while this one encodes.
        embeddings, tokens = await asyncio.to_thread(self._embed, texts)
        return list(zip(embeddings, tokens.tolist()))

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return encode(self.encoder, [text[:WINDOW_CHARS] for text in texts]), count_tokens(texts, self.name)


@dataclass(frozen=True)
class CascadeVerdict:
    """One step of a request's cascade, as the Ranker tells the ingress."""

    next_model: str | None  # the model to ask now; None: stop
    answer: str | None  # the model whose answer is the best so far; None before any answer
    posthoc_quality: dict[str, float]  # each answer obtained, judged against the others


# Artifacts a Ranker replica keeps loaded after swapping them out, for the cascades that started on them.
EARLIER_ARTIFACTS = 2


@dataclass(frozen=True)
class ServedArtifact:
    """The artifact a Ranker replica decides with, and what it derives from it: replaced whole on a swap, so a
    decision never mixes two artifacts."""

    path: str  # as the `user_config` names it: the decisions' `artifact`
    artifact: RouterArtifact
    estimator: PostHocEstimator | None
    models: list[str]
    capabilities: list[Capabilities]  # per pool model


@serve.deployment(name="Ranker", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=512)
class Ranker:
    """Ranks the pool with `RouterArtifact.route`, the evaluation's own decision path,
    leaving out the models that cannot serve the request (`serve.core.capabilities.shortfall`: a feature the request
    needs, a context window too small for the prompt and the answer); for cascades, judges the answers obtained and
    takes the next step with `serve.core.cascade.next_step`, the evaluation's and the batch job's.

    The artifact is the deployment's `user_config` (`{"artifact": PATH}`): a new one set in serve.config and
    deployed (`serve deploy`) is loaded by `reconfigure` in the running replicas, no restart, and takes over
    from the next decision. Each decision names its artifact, and every later step of a cascade is judged by that
    one: the replica keeps the last EARLIER_ARTIFACTS it swapped out, and loads one it never served (a replica
    that a swap reaches earlier or later than the one that decided)."""

    def __init__(self, capabilities: dict[str, Capabilities]):
        self.backend_capabilities = capabilities  # of every model with a backend, in the pool or declared ahead of it
        self.served: ServedArtifact | None = None
        self.earlier: OrderedDict[str, ServedArtifact] = OrderedDict()  # path -> artifact, the latest used last
        self.earlier_lock = threading.Lock()  # judged in threads
        self.decision_latency = Histogram(
            "finerouter_decision_latency_ms",
            description="Time of one routing decision inside the Ranker (features, MoE, ranking).",
            boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50],
        )

    def reconfigure(self, user_config: dict) -> None:
        served = self._load(user_config["artifact"])
        with self.earlier_lock:
            if self.served is not None and self.served.path != served.path:
                self._keep(self.served)
            self.earlier.pop(served.path, None)
            self.served = served

    def _load(self, path: str) -> ServedArtifact:
        artifact = RouterArtifact.load(path)
        return ServedArtifact(path, artifact, artifact.posthoc, artifact.models,
                              [self.backend_capabilities.get(model, Capabilities()) for model in artifact.models])

    def _keep(self, served: ServedArtifact) -> None:
        self.earlier[served.path] = served
        self.earlier.move_to_end(served.path)
        while len(self.earlier) > EARLIER_ARTIFACTS:
            self.earlier.popitem(last=False)

    def _artifact_of(self, decision: RoutingDecision) -> ServedArtifact:
        """The artifact `decision` was made with: the one served now, one swapped out lately, or loaded again."""
        with self.earlier_lock:
            served = self.served
            if decision.artifact == served.path:
                return served
            if decision.artifact in self.earlier:
                self.earlier.move_to_end(decision.artifact)
                return self.earlier[decision.artifact]
        loaded = self._load(decision.artifact)
        with self.earlier_lock:
            self._keep(loaded)
        return loaded

    async def decide(self, embedded: tuple[np.ndarray, int], text: str, cost_weight: float,
                     candidates: list[str] | None = None, max_cost: float | None = None,
                     needs: Needs = Needs()) -> RoutingDecision:
        return await asyncio.to_thread(self._decide, embedded, text, cost_weight, candidates, max_cost, needs)

    def _decide(self, embedded: tuple[np.ndarray, int], text: str, cost_weight: float, candidates: list[str] | None,
                max_cost: float | None, needs: Needs) -> RoutingDecision:
        started = time.perf_counter()
        served = self.served
        embedding, prompt_tokens = embedded
        candidate, lacking = _admissible(served, candidates, needs.with_prompt_tokens(prompt_tokens))
        allowed = candidate & _capable(lacking)
        # When no candidate can serve the request, rank the candidates anyway, so the answer still says what each lacks.
        decision = served.artifact.route(np.asarray(embedding, np.float32)[None, :], [text], np.array([prompt_tokens]), cost_weight,
                                       allowed=allowed if allowed.any() else candidate, cost_cap=max_cost)
        ranking = []
        for index, eligible in zip(decision.order[0], decision.eligible[0]):
            eligible = bool(eligible and allowed[index])
            ranking.append(RankedModel(
                model=served.models[index], predicted_quality=float(decision.quality[0, index]),
                estimated_cost=float(decision.cost[0, index]), eligible=eligible,
                ineligible_because=None if eligible else _why_not(candidate[index], lacking[index])))
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.decision_latency.observe(elapsed_ms)
        return RoutingDecision(task=int(decision.task[0]), task_probability=float(decision.task_probability[0]),
                               cost_weight=cost_weight, prompt_tokens=int(prompt_tokens), ranking=ranking,
                               decision_ms=elapsed_ms, artifact=served.path, cascades=served.estimator is not None)

    async def judge(self, decision: RoutingDecision, max_cost: float | None, needs: Needs,
                    answers: dict[str, tuple[str, np.ndarray]], unavailable: list[str]) -> CascadeVerdict:
        """The next step of a request's cascade: `decision` is its routing decision (the ex-ante estimates and
        costs, among the candidates it was asked to choose from), `answers` model -> (answer text, embedding of its
        opening) the answers obtained so far, and `unavailable` the models whose backends failed. Judged by the
        artifact that made `decision`."""
        return await asyncio.to_thread(self._judge, decision, max_cost, needs, answers, unavailable)

    def _judge(self, decision: RoutingDecision, max_cost: float | None, needs: Needs,
               answers: dict[str, tuple[str, np.ndarray]], unavailable: list[str]) -> CascadeVerdict:
        served = self._artifact_of(decision)
        models = served.models
        by_model = {entry.model: entry for entry in decision.ranking}
        ex_ante = np.array([[by_model[model].predicted_quality for model in models]])
        cost = np.array([[by_model[model].estimated_cost for model in models]])
        responses = np.array([[answers[model][0] if model in answers else "" for model in models]], dtype=object)
        embeddings = np.zeros((1, len(models), served.artifact.embedding_dimension), np.float32)
        for index, model in enumerate(models):
            if model in answers:
                embeddings[0, index] = answers[model][1]
        ran = np.isin(models, list(answers))[None]
        candidate, lacking = _admissible(served, decision.candidates(), needs.with_prompt_tokens(decision.prompt_tokens))
        allowed = candidate & _capable(lacking) & ~np.isin(models, unavailable)
        judgement = next_step(served.estimator, ex_ante, cost, ran, *judged_answers(responses, embeddings), decision.cost_weight,
                              served.artifact.cost_scale, allowed=allowed[None], cost_cap=max_cost)
        step = judgement.step
        return CascadeVerdict(
            next_model=models[step.next_model[0]] if step.next_model[0] >= 0 else None,
            answer=models[step.answer[0]] if step.answer[0] >= 0 else None,
            posthoc_quality={model: float(judgement.quality[0, index]) for index, model in enumerate(models) if model in answers})


def _admissible(served: ServedArtifact, candidates: list[str] | None, needs: Needs) -> tuple[np.ndarray, list[Shortfall | None]]:
    """[M] bool: among the request's candidates; and what keeps each model from serving it (None: nothing)."""
    candidate = np.ones(len(served.models), bool) if candidates is None else np.isin(served.models, candidates)
    return candidate, shortfalls(served.capabilities, needs)


def _capable(lacking: list[Shortfall | None]) -> np.ndarray:
    return np.array([reason is None for reason in lacking], bool)


def _why_not(candidate: bool, lacking: Shortfall | None) -> str:
    if not candidate:
        return NOT_A_CANDIDATE
    return lacking.reason if lacking is not None else "over max_cost"
