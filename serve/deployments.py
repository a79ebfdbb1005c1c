"""The Embedder and Router deployments: the two steps of a routing decision.

They are separate so that each scales on its own: the encoder is the expensive, batchable part (and the one
that wants a GPU), the decision is a few matrix products on the artifact.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve
from ray.serve.metrics import Histogram

from serve.artifact import RouterArtifact
from serve.config import EmbedderConfig
from serve.protocol import RankedModel, RoutingDecision
from serve.encoder import count_tokens, encode, load_encoder


@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
class Embedder:
    """Prompt -> (embedding, prompt tokens), with the same encoder and token counts as training."""

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
        return encode(self.encoder, texts), count_tokens(texts, self.name)


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class Router:
    """Loads the artifact once and decides with `RouterArtifact.route`, the evaluation's own decision path."""

    def __init__(self, artifact_path: str):
        self.artifact = RouterArtifact.load(artifact_path)
        self.models = self.artifact.models
        self.decision_latency = Histogram(
            "finerouter_decision_latency_ms",
            description="Time of one routing decision inside the Router (features, MoE, ranking).",
            boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50],
        )

    def decide(self, embedded: tuple[np.ndarray, int], text: str, cost_weight: float,
               candidates: list[str] | None = None, max_cost: float | None = None) -> RoutingDecision:
        started = time.perf_counter()
        embedding, prompt_tokens = embedded
        allowed = None if candidates is None else np.isin(self.models, candidates)
        decision = self.artifact.route(np.asarray(embedding, np.float32)[None, :], [text], np.array([prompt_tokens]), cost_weight,
                                       allowed=allowed, cost_cap=max_cost)
        ranking = [
            RankedModel(model=self.models[index], predicted_quality=float(decision.quality[0, index]),
                        estimated_cost=float(decision.cost[0, index]), eligible=bool(eligible))
            for index, eligible in zip(decision.order[0], decision.eligible[0])
        ]
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.decision_latency.observe(elapsed_ms)
        return RoutingDecision(task=int(decision.task[0]), task_probability=float(decision.task_probability[0]),
                               cost_weight=cost_weight, prompt_tokens=int(prompt_tokens), ranking=ranking,
                               decision_ms=elapsed_ms)
