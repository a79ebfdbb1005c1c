"""FineRouter training: a routing table's training rows -> one router artifact.

Stage 1 discovers latent tasks (kNN graph + Leiden, settings chosen on a validation slice) and tabulates each
model's shrunk mean quality per task; the task classifier and the Stage 2 mixture of experts are then fitted
(Ray Train, or in-process for the evaluation's many folds), and the blend between the two is chosen on the
same validation slice. Nothing here looks at test prompts.
"""

from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from serve.artifact import RouterArtifact
from serve.features import prompt_features
from training.graph import knn, leiden, merge_small_communities, task_graph
from training.moe import (
    NetworkConfig,
    export_weights,
    platt_scaling,
    train_networks,
    train_with_ray,
)
from training.routers import Router, TrainingSet, inner_product_index, validation_score


@dataclass
class FitConfig:
    embedder: str = "all-MiniLM-L6-v2"
    # Stage 1 grid, chosen on validation: kNN degree, performance-similarity mix of edge weights, Leiden resolution.
    ks: tuple[int, ...] = (10, 25)
    mixes: tuple[float, ...] = (0.0, 0.5)
    resolutions: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_task_size: int = 20
    shrinkage: float = 20.0  # prompts' worth of the global mean mixed into each task's mean
    candidate_margin: float = 0.1  # a task's candidates: models within this of the task's best mean quality
    blends: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_task_blend: bool = False  # a blend weight per task where validation has enough of its prompts
    prompt_features: bool = True  # surface features beside the embedding (off: the networks see zeros)
    calibrate: bool = False  # Platt-scale each model's MoE quality on the validation slice before the blend
    validation_fraction: float = 0.2
    network: NetworkConfig = field(default_factory=NetworkConfig)
    trainer: str = "ray"  # "ray" (TorchTrainer) or "local" (the same loop in-process)
    num_workers: int = 1
    use_gpu: bool = False
    seed: int = 0


class _TableRouter(Router):
    """Stage 1 alone during selection: validation prompts take the task mix of their nearest fit prompts."""

    def __init__(self, embeddings, labels, task_quality, neighbours: int = 10):
        self.index, self.labels, self.task_quality, self.neighbours = inner_product_index(embeddings), labels, task_quality, neighbours

    def predict_quality(self, embeddings, prompts=None):
        _, nearest = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), self.neighbours)
        mix = np.stack([np.bincount(row, minlength=len(self.task_quality)) for row in self.labels[nearest]]) / self.neighbours
        return mix @ self.task_quality


class ArtifactRouter(Router):
    """A router artifact seen through the evaluation's Router interface."""

    def __init__(self, artifact: RouterArtifact):
        self.artifact = artifact

    def predict_quality(self, embeddings, prompts):
        return self.artifact.predict(embeddings, prompts)[0]


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
    neighbours, similarities = knn(fit.embeddings, max(config.ks), seed=config.seed)  # once, sliced per k
    for k, mix in itertools.product(config.ks, config.mixes):
        graph = task_graph(neighbours[:, :k], similarities[:, :k], fit.table.scores, mix)
        for resolution in config.resolutions:
            labels = merge_small_communities(leiden(graph, resolution, config.seed), fit.embeddings, config.min_task_size)
            table = task_table(labels, fit.table.scores, config.shrinkage)
            score = validation_score(_TableRouter(fit.embeddings, labels, table), fit, validation)
            trials.append({"k": k, "mix": mix, "resolution": resolution, "tasks": int(labels.max() + 1), "validation_score": score, "labels": labels})
    best = max(trials, key=lambda t: t["validation_score"])
    return best, best.pop("labels"), [{key: v for key, v in t.items() if key != "labels"} for t in trials]


def _choose_blend(artifact: RouterArtifact, fit: TrainingSet, validation: TrainingSet, config: FitConfig) -> tuple[np.ndarray, dict]:
    """One blend weight for all tasks (and, with per_task_blend, one per well-represented task), by validation."""
    scores = {a: validation_score(ArtifactRouter(artifact.with_blend(a)), fit, validation) for a in config.blends}
    best = max(scores, key=scores.get)
    blend = np.full(artifact.weights["task_quality"].shape[0], best, dtype=np.float32)
    if config.per_task_blend:
        _, tasks = artifact.predict(validation.embeddings, validation.table.prompts)
        top = tasks.argmax(axis=1)
        for t in np.flatnonzero(np.bincount(top, minlength=len(blend)) >= 30):
            rows = np.flatnonzero(top == t)
            part = validation.subset(rows)
            blend[t] = max(config.blends, key=lambda a: validation_score(ArtifactRouter(artifact.with_blend(a)), fit, part))
    return blend, {str(a): s for a, s in scores.items()}


def fit_router(data: TrainingSet, config: FitConfig = FitConfig(), log=print) -> RouterArtifact:
    """Train FineRouter on `data` (every row is a training row) and return the artifact (not yet saved)."""
    started = time.perf_counter()
    fit, validation = data.validation_split(config.seed, config.validation_fraction)
    stage1, labels, trials = _select_stage1(fit, validation, config)
    log(f"stage 1: {stage1['tasks']} tasks (k={stage1['k']}, mix={stage1['mix']}, resolution={stage1['resolution']}), validation {stage1['validation_score']:.4f}")

    table = task_table(labels, fit.table.scores, config.shrinkage)
    candidates = (table >= table.max(axis=1, keepdims=True) - config.candidate_margin).astype(np.float32)
    features = prompt_features(fit.table.prompts)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    if not config.prompt_features:
        std = np.full_like(std, np.inf)  # standardised features become 0 in training and at inference
    inputs = np.concatenate([fit.embeddings, (features - mean) / std], axis=1).astype(np.float32)
    validation_features = (prompt_features(validation.table.prompts) - mean) / std
    network_data = {
        "inputs": inputs,
        "scores": fit.table.scores.astype(np.float32),
        "costs": (fit.table.costs / data.cost_scale).astype(np.float32),
        "tasks": labels,
        "candidates": candidates,
        "validation_inputs": np.concatenate([validation.embeddings, validation_features], axis=1).astype(np.float32),
        "validation_scores": validation.table.scores.astype(np.float32),
        "validation_costs": (validation.table.costs / data.cost_scale).astype(np.float32),
    }
    network = replace(config.network, seed=config.seed)
    if config.trainer == "ray":
        networks = train_with_ray(network_data, network, num_workers=config.num_workers, use_gpu=config.use_gpu)
    else:
        networks = train_networks(network_data, network)
    history = networks["history"]
    log(f"stage 2: loss {history['phase1_loss'][0]:.4f} -> {history['phase1_loss'][-1]:.4f} (phase 1), {history['phase2_loss'][-1]:.4f} (phase 2)")

    cost_model = data.cost_model
    weights = {
        **export_weights(networks),
        "feature_mean": mean,
        "feature_std": std,
        "task_quality": table.astype(np.float32),
        "blend": np.ones(len(table), np.float32),
        "calibration_scale": np.ones(len(data.table.models), np.float32),
        "calibration_shift": np.zeros(len(data.table.models), np.float32),
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
        "training_config": {**asdict(config), "network": asdict(network)},
        "training_rows": len(data.table),
    }
    artifact = RouterArtifact(manifest, weights)
    if config.calibrate:
        logits, _ = artifact.moe_logits(validation.embeddings, validation.table.prompts)
        weights["calibration_scale"], weights["calibration_shift"] = platt_scaling(logits, validation.table.scores)
    blend, blend_scores = _choose_blend(artifact, fit, validation, config)
    artifact.weights["blend"] = blend
    artifact.manifest["validation"] = {
        "score": validation_score(ArtifactRouter(artifact), fit, validation),
        "stage1": stage1,
        "stage1_trials": trials,
        "blend": blend_scores,
        "loss_history": history,
    }
    log(f"blend: {blend_scores} -> {sorted(set(blend.tolist()))}; fitted in {time.perf_counter() - started:.1f}s")
    return artifact


# Fitted artifacts per (training set, seed, variant), so that the ablations that only change the blend reuse
# the evaluation's fit instead of training again.
_fitted: weakref.WeakKeyDictionary[TrainingSet, dict] = weakref.WeakKeyDictionary()


def _evaluation_fit(data: TrainingSet, seed: int, semantic_only: bool = False) -> RouterArtifact:
    cache = _fitted.setdefault(data, {})
    key = (seed, semantic_only)
    if key not in cache:
        config = FitConfig(seed=seed, trainer="local", **({"mixes": (0.0,)} if semantic_only else {}))
        cache[key] = fit_router(data, config, log=lambda message: None)
    return cache[key]


# FineRouter and its ablations, as the evaluation builds them (name -> builder(training set, seed)).
FINEROUTER_VARIANTS = {
    "finerouter": lambda data, seed: ArtifactRouter(_evaluation_fit(data, seed)),
    "finerouter_stage1": lambda data, seed: ArtifactRouter(_evaluation_fit(data, seed).with_blend(0.0)),
    "finerouter_stage2": lambda data, seed: ArtifactRouter(_evaluation_fit(data, seed).with_blend(1.0)),
    "finerouter_semantic_graph": lambda data, seed: ArtifactRouter(_evaluation_fit(data, seed, semantic_only=True)),
}
