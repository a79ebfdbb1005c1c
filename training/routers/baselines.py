"""The baseline routers: what FineRouter must beat, from knowing nothing about the prompt (prior) to nearest
neighbours, clusters and a per-model regressor."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from training.moe import single_threaded
from training.routers.base import Router, TrainingSet, inner_product_index, tune


class PriorRouter(Router):
    """Routing without looking at the prompt: each model's mean training score, the same for every prompt.
    Only the estimated cost still varies (with the prompt's length): the honest "no routing" curve, where
    the zero router's hull knows the best single model on the test prompts."""

    baseline = True

    def __init__(self, data: TrainingSet):
        self.means = data.table.scores.mean(axis=0)

    @classmethod
    def fit(cls, train, seed):
        return cls(train)

    def predict_quality(self, embeddings, prompts=None):
        return np.broadcast_to(self.means, (len(embeddings), len(self.means))).copy()


class KNNRouter(Router):
    """Mean scores of the k most similar training prompts (k chosen on a validation slice)."""

    baseline = True
    K = (5, 10, 20, 50, 100)

    def __init__(self, data: TrainingSet, k: int):
        self.index, self.scores, self.k = inner_product_index(data.embeddings), data.table.scores, k

    @classmethod
    def fit(cls, train, seed):
        return tune(lambda d, s, k: cls(d, k), cls.K, train, seed)[0]

    def predict_quality(self, embeddings, prompts=None):
        _, neighbours = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), self.k)
        return self.scores[neighbours].mean(axis=1)


class ClusterRouter(Router):
    """Avengers-Pro style: k-means clusters of training prompts, each with its models' mean scores; a prompt
    takes the softmax-weighted profiles of its top-3 nearest centroids (the number of clusters chosen on a
    validation slice)."""

    baseline = True
    CLUSTERS = (8, 16, 32, 64)
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

    @classmethod
    def fit(cls, train, seed):
        return tune(lambda d, s, k: cls(d, k, s), cls.CLUSTERS, train, seed)[0]

    def predict_quality(self, embeddings, prompts=None):
        similarity, nearest = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), self.TOP)
        weights = np.exp((similarity - similarity[:, :1]) / self.TEMPERATURE)
        weights /= weights.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkm->nm", weights, self.profiles[nearest])


class MLPRouter(Router):
    """A per-model quality regressor on the embedding: one hidden layer, sigmoid outputs, BCE on soft scores,
    early-stopped on a validation slice."""

    baseline = True

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
