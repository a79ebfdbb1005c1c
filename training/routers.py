"""Learned baseline routers and their registry (RouteLLM style: one abstract method, a name -> builder map).

Every router only predicts each pool model's quality on each prompt; the shared decision rule
(`serve.decision.rank_models`) turns that into choices, so routers differ only in what they know.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import faiss
import numpy as np
import torch

from serve.decision import CostModel
from training.datasets import RoutingTable
from training.metrics import curve_aiq, trace_curve
from training.moe import single_threaded


@dataclass(eq=False)  # hashed by identity, so fitted routers can be cached per training set
class TrainingSet:
    """A routing table's training rows with their prompt embeddings."""

    table: RoutingTable
    embeddings: np.ndarray

    @cached_property
    def cost_model(self) -> CostModel:
        return CostModel.fit(self.table.prompt_tokens, self.table.costs)

    @cached_property
    def cost_scale(self) -> float:
        """Mean cost of the most expensive model: the unit of the dimensionless cost weight."""
        return float(self.table.costs.mean(axis=0).max()) or 1.0

    def subset(self, rows: np.ndarray) -> TrainingSet:
        return TrainingSet(self.table.subset(rows), self.embeddings[rows])

    def validation_split(self, seed: int, fraction: float = 0.2) -> tuple[TrainingSet, TrainingSet]:
        """A seeded (fit, validation) split that keeps duplicate prompts on one side."""
        unique, group = np.unique(np.asarray(self.table.prompts, dtype=object), return_inverse=True)
        held = np.random.default_rng(seed).random(len(unique)) < fraction
        return self.subset(~held[group]), self.subset(held[group])


class Router(ABC):
    """Predicts each pool model's quality (expected score in [0, 1]) on each prompt."""

    @abstractmethod
    def predict_quality(self, embeddings: np.ndarray, prompts: list[str]) -> np.ndarray:
        """[N, M] predicted quality for N prompts (their embeddings and texts)."""


def validation_score(router: Router, train: TrainingSet, validation: TrainingSet) -> float:
    """What tuning maximises: AIQ on the validation slice, or the routed quality where all models cost alike."""
    quality = router.predict_quality(validation.embeddings, validation.table.prompts)
    table = validation.table
    estimated = train.cost_model.estimate(table.prompt_tokens)
    curve = trace_curve(quality, estimated, table.scores, table.costs, train.cost_scale)
    score = curve_aiq(curve, table.costs) if table.has_costs else None
    return float(curve[1][0].mean()) if score is None else score


def tune(build: Callable[[TrainingSet, int, object], Router], options, data: TrainingSet, seed: int) -> tuple[Router, object]:
    """Pick the option with the best validation score, then refit it on all of `data`."""
    fit_part, validation = data.validation_split(seed)
    scores = [validation_score(build(fit_part, seed, option), fit_part, validation) for option in options]
    best = options[int(np.argmax(scores))]
    return build(data, seed, best), best


def inner_product_index(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


class KNNRouter(Router):
    """Mean scores of the k most similar training prompts."""

    def __init__(self, data: TrainingSet, k: int):
        self.index, self.scores, self.k = inner_product_index(data.embeddings), data.table.scores, k

    def predict_quality(self, embeddings, prompts=None):
        _, neighbours = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), self.k)
        return self.scores[neighbours].mean(axis=1)


class ClusterRouter(Router):
    """Avengers-Pro style: k-means clusters of training prompts, each with its models' mean scores; a prompt
    takes the softmax-weighted profiles of its top-3 nearest centroids."""

    TOP = 3
    TEMPERATURE = 0.05

    def __init__(self, data: TrainingSet, clusters: int, seed: int):
        kmeans = faiss.Kmeans(data.embeddings.shape[1], clusters, niter=25, seed=seed, spherical=True, verbose=False)
        kmeans.train(np.ascontiguousarray(data.embeddings, dtype=np.float32))
        _, assignment = kmeans.index.search(np.ascontiguousarray(data.embeddings, dtype=np.float32), 1)
        assignment = assignment[:, 0]
        overall = data.table.scores.mean(axis=0)
        self.profiles = np.stack(
            [data.table.scores[assignment == c].mean(axis=0) if (assignment == c).any() else overall for c in range(clusters)]
        )
        self.index = inner_product_index(kmeans.centroids)

    def predict_quality(self, embeddings, prompts=None):
        similarity, nearest = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), self.TOP)
        weights = np.exp((similarity - similarity[:, :1]) / self.TEMPERATURE)
        weights /= weights.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkm->nm", weights, self.profiles[nearest])


class MLPRouter(Router):
    """A per-model quality regressor on the embedding: one hidden layer, sigmoid outputs, BCE on soft scores,
    early-stopped on a validation slice."""

    @single_threaded()
    def __init__(self, data: TrainingSet, seed: int, hidden: int = 256, epochs: int = 60):
        torch.manual_seed(seed)
        fit_part, validation = data.validation_split(seed + 1000)
        x, y = (torch.as_tensor(a, dtype=torch.float32) for a in (fit_part.embeddings, fit_part.table.scores))
        xv, yv = (torch.as_tensor(a, dtype=torch.float32) for a in (validation.embeddings, validation.table.scores))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, y.shape[1])
        )
        optimiser = torch.optim.AdamW(self.net.parameters(), lr=1e-3, weight_decay=1e-2)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        generator = torch.Generator().manual_seed(seed)
        best_loss, best_state = float("inf"), None
        for _ in range(epochs):
            self.net.train()
            for batch in torch.randperm(len(x), generator=generator).split(128):
                optimiser.zero_grad()
                loss_fn(self.net(x[batch]), y[batch]).backward()
                optimiser.step()
            self.net.eval()
            with torch.no_grad():
                loss = loss_fn(self.net(xv), yv).item()
            if loss < best_loss:
                best_loss, best_state = loss, {k: v.clone() for k, v in self.net.state_dict().items()}
        self.net.load_state_dict(best_state)
        self.net.eval()

    def predict_quality(self, embeddings, prompts=None):
        with torch.no_grad():
            return torch.sigmoid(self.net(torch.as_tensor(embeddings, dtype=torch.float32))).numpy().astype(np.float64)


KNN_K = (5, 10, 20, 50, 100)
CLUSTER_K = (8, 16, 32, 64)

# name -> builder(training set, seed) -> router.
BASELINE_ROUTERS: dict[str, Callable[[TrainingSet, int], Router]] = {
    "knn": lambda data, seed: tune(lambda d, s, k: KNNRouter(d, k), KNN_K, data, seed)[0],
    "cluster": lambda data, seed: tune(lambda d, s, k: ClusterRouter(d, k, s), CLUSTER_K, data, seed)[0],
    "mlp": lambda data, seed: MLPRouter(data, seed),
}
