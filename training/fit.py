"""FineRouter training: a routing table's training rows -> one router artifact.

Stage 1 discovers latent tasks (kNN graph + Leiden, settings chosen on a validation slice) and tabulates each
model's shrunk mean quality per task; the task classifier and the Stage 2 mixture of experts are then fitted
(Ray Train, or in-process for the evaluation's many folds), and the blend between the two is chosen on the
same validation slice. Nothing here looks at test prompts.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from serve.core.artifact import RouterArtifact, network_inputs
from serve.core.encoder import DEFAULT_EMBEDDER
from serve.core.features import prompt_features
from training.graph import knn, leiden, merge_small_communities, task_graph
from training.moe import (
    NetworkConfig,
    export_weights,
    in_memory_datasets,
    train_networks,
    train_with_ray,
)
from training.routers.base import (
    ArtifactRouter,
    Router,
    TrainingSet,
    inner_product_index,
    validation_score,
)

KNN_ON_RAY_FROM_ROWS = 100_000  # below, one process answers the kNN queries faster than an actor pool starts


@dataclass
class FitConfig:
    embedder: str = DEFAULT_EMBEDDER
    # Stage 1 grid, chosen on validation: kNN degree, performance-similarity mix of edge weights, Leiden resolution.
    ks: tuple[int, ...] = (10, 25)
    mixes: tuple[float, ...] = (0.0, 0.5)
    resolutions: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_task_size: int = 20
    shrinkage: float = 20.0  # prompts' worth of the global mean mixed into each task's mean
    candidate_margin: float = 0.1  # a task's candidates: models within this of the task's best mean quality
    blends: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    prompt_features: bool = True  # surface features beside the embedding (off: the networks see zeros)
    validation_fraction: float = 0.2
    network: NetworkConfig = field(default_factory=NetworkConfig)
    trainer: str = "ray"  # "ray" (TorchTrainer) or "local" (the same loop in-process)
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 5  # Ray Train: epochs between checkpoints
    knn_on_ray: bool | None = None  # the kNN graph in a Ray task on the largest node; None: from KNN_ON_RAY_FROM_ROWS fit rows
    seed: int = 0


class _TableRouter(Router):
    """Stage 1 alone during selection: validation prompts take the task mix of their nearest fit prompts."""

    def __init__(self, embeddings, labels, task_quality, neighbours: int = 10):
        self.index, self.labels, self.task_quality, self.neighbours = inner_product_index(embeddings), labels, task_quality, neighbours

    def predict_quality(self, embeddings, prompts=None):
        _, nearest = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), self.neighbours)
        mix = np.stack([np.bincount(row, minlength=len(self.task_quality)) for row in self.labels[nearest]]) / self.neighbours
        return mix @ self.task_quality


def task_table(labels: np.ndarray, scores: np.ndarray, shrinkage: float) -> np.ndarray:
    """[T, M] each model's mean score per task, shrunk toward its global mean by `shrinkage` pseudo-prompts."""
    tasks = labels.max() + 1
    sums = np.zeros((tasks, scores.shape[1]))
    np.add.at(sums, labels, scores)
    counts = np.bincount(labels, minlength=tasks)[:, None]
    return (sums + shrinkage * scores.mean(axis=0)) / (counts + shrinkage)


def _select_stage1(fit: TrainingSet, validation: TrainingSet, config: FitConfig) -> tuple[dict, np.ndarray, list]:
    """The (k, mix, resolution) whose task table routes the validation slice best."""
    trials = []
    on_ray = len(fit.embeddings) >= KNN_ON_RAY_FROM_ROWS if config.knn_on_ray is None else config.knn_on_ray
    neighbours, similarities = knn(fit.embeddings, max(config.ks), seed=config.seed, use_ray=on_ray)  # once, sliced per k
    for k, mix in itertools.product(config.ks, config.mixes):
        graph = task_graph(neighbours[:, :k], similarities[:, :k], fit.table.scores, mix)
        for resolution in config.resolutions:
            labels = merge_small_communities(leiden(graph, resolution, config.seed), fit.embeddings, config.min_task_size)
            table = task_table(labels, fit.table.scores, config.shrinkage)
            score = validation_score(_TableRouter(fit.embeddings, labels, table), fit, validation)
            trials.append({"k": k, "mix": mix, "resolution": resolution, "tasks": int(labels.max() + 1), "validation_score": score, "labels": labels})
    best = max(trials, key=lambda t: t["validation_score"])
    return best, best.pop("labels"), [{key: v for key, v in t.items() if key != "labels"} for t in trials]


def _choose_blend(artifact: RouterArtifact, fit: TrainingSet, validation: TrainingSet, config: FitConfig) -> tuple[float, dict]:
    """The blend weight (one for every task) that routes the validation slice best."""
    scores = {a: validation_score(ArtifactRouter(artifact.with_blend(a)), fit, validation) for a in config.blends}
    return max(scores, key=scores.get), {str(a): s for a, s in scores.items()}


def feature_scaling(features: np.ndarray, use_features: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) that standardise the prompt features; without features the networks see zeros."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    return mean, (std if use_features else np.full_like(std, np.inf))


def task_candidates(table: np.ndarray, margin: float) -> np.ndarray:
    """[T, M] 1 where a model is within `margin` of its task's best mean quality: the task heads' candidates."""
    return (table >= table.max(axis=1, keepdims=True) - margin).astype(np.float32)


def fit_router(data: TrainingSet, config: FitConfig = FitConfig(), log=print) -> RouterArtifact:
    """Train FineRouter on `data` (every row is a training row) and return the artifact (not yet saved)."""
    started = time.perf_counter()
    fit, validation = data.validation_split(config.seed, config.validation_fraction)
    stage1, labels, trials = _select_stage1(fit, validation, config)
    log(f"stage 1: {stage1['tasks']} tasks (k={stage1['k']}, mix={stage1['mix']}, resolution={stage1['resolution']}), validation {stage1['validation_score']:.4f}")

    table = task_table(labels, fit.table.scores, config.shrinkage)
    candidates = task_candidates(table, config.candidate_margin)
    mean, std = feature_scaling(prompt_features(fit.table.prompts), config.prompt_features)
    network_data = {
        "inputs": network_inputs(fit.embeddings, fit.table.prompts, mean, std),
        "scores": fit.table.scores.astype(np.float32),
        "tasks": labels,
        "candidates": candidates,
        "validation_inputs": network_inputs(validation.embeddings, validation.table.prompts, mean, std),
        "validation_scores": validation.table.scores.astype(np.float32),
    }
    network = replace(config.network, seed=config.seed)
    if config.trainer == "ray":
        networks = train_with_ray(in_memory_datasets(network_data), candidates, network, num_workers=config.num_workers, use_gpu=config.use_gpu,
                                  checkpoint_every=config.checkpoint_every)
    else:
        networks = train_networks(network_data, network)
    artifact = assemble_artifact(networks, table, (mean, std), data, fit, validation, config,
                                 {"stage1": stage1, "stage1_trials": trials}, log)
    log(f"fitted in {time.perf_counter() - started:.1f}s")
    return artifact


def assemble_artifact(networks: dict, table: np.ndarray, scaling: tuple[np.ndarray, np.ndarray], data: TrainingSet,
                      fit: TrainingSet, validation: TrainingSet, config: FitConfig, selection: dict, log,
                      training_rows: int | None = None) -> RouterArtifact:
    """The artifact from trained networks and the task table; the blend chosen on the validation slice.

    `data` names the dataset and carries the cost model (a streamed corpus passes its in-memory sample);
    `training_rows` is how many rows trained it (default: all of `data`)."""
    history = networks["history"]
    log(f"stage 2: loss {history['phase1_loss'][0]:.4f} -> {history['phase1_loss'][-1]:.4f} (phase 1), {history['phase2_loss'][-1]:.4f} (phase 2)")
    cost_model = data.cost_model
    weights = {
        **export_weights(networks),
        "feature_mean": scaling[0],
        "feature_std": scaling[1],
        "task_quality": table.astype(np.float32),
        "blend": np.float32(1.0),
        "cost_per_token": cost_model.per_token,
        "cost_fixed": cost_model.fixed,
    }
    manifest = {
        "embedder": config.embedder,
        "dataset": data.table.name,
        "models": data.table.models,
        "prices": {m: list(p) for m, p in data.table.prices.items()},
        "cost_scale": data.cost_scale,
        "tasks": len(table),
        "training_config": {**asdict(config), "network": asdict(replace(config.network, seed=config.seed))},
        "training_rows": len(data.table) if training_rows is None else training_rows,
    }
    blend, blend_scores = _choose_blend(RouterArtifact(manifest, weights), fit, validation, config)
    artifact = RouterArtifact(manifest, weights).with_blend(blend)
    artifact.manifest["validation"] = {
        "score": validation_score(ArtifactRouter(artifact), fit, validation),
        **selection,
        "blend": blend_scores,
        "loss_history": history,
    }
    log(f"blend: {blend_scores} -> {blend}")
    return artifact
