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

from serve.artifact import RouterArtifact, familiar_prompts, network_inputs
from serve.encoder import DEFAULT_EMBEDDER
from serve.features import prompt_features
from training.graph import knn, leiden, merge_small_communities, task_graph
from training.moe import NetworkConfig, export_weights, train_networks, train_with_ray
from training.routers.base import (
    ArtifactRouter,
    Router,
    TrainingSet,
    inner_product_index,
    routed_score,
    validation_score,
)


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
    # The fallback toward the prior on unfamiliar prompts: chosen on whole benchmarks held out of a second fit.
    fallback_holdout: float = 0.25  # about this fraction of the training rows, as whole benchmarks
    fallback_ceilings: tuple[float, ...] = (0.7, 0.85, 1.0)
    fallback_quantiles: tuple[float, ...] = tuple(np.round(np.arange(0.05, 1.0, 0.1), 2))  # centers: familiarity quantiles
    fallback_slopes: tuple[float, ...] = (15.0, 40.0, 130.0)  # per unit of familiarity (a difference of cosine similarities)
    familiar_weight: float = 4.0  # the familiar slice's weight against the held-out benchmarks' mean in the fallback's score
    familiar_sample: int = 4096  # training prompts the artifact keeps to measure familiarity: bounded, whatever the corpus
    network: NetworkConfig = field(default_factory=NetworkConfig)
    trainer: str = "ray"  # "ray" (TorchTrainer) or "local" (the same loop in-process)
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 5  # Ray Train: epochs between checkpoints
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


def _choose_blend(artifact: RouterArtifact, fit: TrainingSet, validation: TrainingSet, config: FitConfig) -> tuple[float, dict]:
    """The blend weight (one for every task) that routes the validation slice best."""
    scores = {a: validation_score(ArtifactRouter(artifact.with_blend(a)), fit, validation) for a in config.blends}
    return max(scores, key=scores.get), {str(a): s for a, s in scores.items()}


def _learned_weights(fit: TrainingSet, validation: TrainingSet, labels: np.ndarray, config: FitConfig) -> tuple[dict, dict]:
    """The task table, the classifier and the MoE fitted on `fit` (early-stopped on `validation`), as artifact
    arrays (blend 1), and the networks' loss history."""
    table = task_table(labels, fit.table.scores, config.shrinkage)
    candidates = (table >= table.max(axis=1, keepdims=True) - config.candidate_margin).astype(np.float32)
    features = prompt_features(fit.table.prompts)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    if not config.prompt_features:
        std = np.full_like(std, np.inf)  # standardised features become 0 in training and at inference
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
        networks = train_with_ray(network_data, network, num_workers=config.num_workers, use_gpu=config.use_gpu,
                                  checkpoint_every=config.checkpoint_every)
    else:
        networks = train_networks(network_data, network)
    weights = {**export_weights(networks), "feature_mean": mean, "feature_std": std, "task_quality": table.astype(np.float32),
               "blend": np.float32(1.0)}
    return weights, networks["history"]


def _held_out_benchmarks(data: TrainingSet, seed: int, fraction: float) -> list[str]:
    """A seeded choice of whole benchmarks, about `fraction` of the rows, that plays unfamiliar work for the
    fallback's choice; none where fewer than three benchmarks leave too little to hold out and still learn from."""
    benchmarks, rows = np.unique(data.table.benchmarks.astype(str), return_counts=True)
    if len(benchmarks) < 3:
        return []
    order = np.random.default_rng(seed).permutation(len(benchmarks))
    reaching = int(np.searchsorted(np.cumsum(rows[order]), fraction * len(data.table))) + 1
    return sorted(benchmarks[order[: min(reaching, len(benchmarks) - 2)]].tolist())


def _familiar_sample(embeddings: np.ndarray, size: int, seed: int) -> dict[str, np.ndarray]:
    """The artifact's familiarity arrays for a seeded sample of `size` rows of `embeddings`."""
    rows = np.random.default_rng(seed).choice(len(embeddings), size=min(size, len(embeddings)), replace=False)
    return familiar_prompts(embeddings[np.sort(rows)])


def _choose_fallback(artifact: RouterArtifact, data: TrainingSet, fit: TrainingSet, validation: TrainingSet, stage1: dict,
                     config: FitConfig) -> tuple[RouterArtifact, dict]:
    """`artifact` with the fallback curve that routes best where the learned estimate meets work it never saw.

    Whole benchmarks are held out of a second fit (Stage 1's chosen graph settings, the same networks and blend),
    which then routes those benchmarks and the familiar validation prompts. The curve maximises the familiar
    slice's score (weighted `familiar_weight`: familiar gains come first) plus the mean score over the held-out
    benchmarks, so that it keeps its gains on familiar work and does not trust the learned estimate where it
    does not know. Both fits keep the same number of familiar prompts, so that a familiarity means the same in each.
    """
    held_out = _held_out_benchmarks(data, config.seed, config.fallback_holdout)
    if not held_out:
        sample = _familiar_sample(fit.embeddings, config.familiar_sample, config.seed)
        return RouterArtifact(artifact.manifest, {**artifact.weights, **sample}), {"held_out_benchmarks": []}

    def in_held_out(part: TrainingSet) -> np.ndarray:
        return np.isin(part.table.benchmarks.astype(str), held_out)

    known_fit, known_validation = fit.subset(~in_held_out(fit)), validation.subset(~in_held_out(validation))
    unfamiliar = data.subset(in_held_out(data))
    neighbours, similarities = knn(known_fit.embeddings, stage1["k"], seed=config.seed)
    graph = task_graph(neighbours, similarities, known_fit.table.scores, stage1["mix"])
    labels = merge_small_communities(leiden(graph, stage1["resolution"], config.seed), known_fit.embeddings, config.min_task_size)
    sample_size = min(config.familiar_sample, len(known_fit.table))
    learned, _ = _learned_weights(known_fit, known_validation, labels, config)
    probe = RouterArtifact(artifact.manifest, {**artifact.weights, **learned, "blend": artifact.weights["blend"],
                                               "prior_quality": known_fit.table.scores.mean(axis=0),
                                               **_familiar_sample(known_fit.embeddings, sample_size, config.seed)})
    slices = [known_validation, *(unfamiliar.subset(unfamiliar.table.benchmarks.astype(str) == name) for name in held_out)]
    estimates = []
    for part in slices:
        inputs = probe.inputs(part.embeddings, part.table.prompts)
        estimates.append((probe.learned_quality(inputs)[0], probe.familiarity(part.embeddings)))
    familiarity = np.concatenate([f for _, f in estimates])
    prior = probe.weights["prior_quality"][None, :]

    def score(curve: RouterArtifact) -> float:
        routed = []
        for part, (learned_quality, part_familiarity) in zip(slices, estimates):
            weight = curve.learned_weight(part_familiarity)[:, None]
            routed.append(routed_score(weight * learned_quality + (1 - weight) * prior, known_fit, part))
        return config.familiar_weight * routed[0] + float(np.mean(routed[1:]))

    centers = [-np.inf, *np.quantile(familiarity, config.fallback_quantiles)]
    grid = {(float(ceiling), float(center), float(slope)): score(probe.with_fallback(ceiling, center, slope))
            for ceiling in config.fallback_ceilings for center in centers for slope in (config.fallback_slopes if center > -np.inf else (1.0,))}
    ceiling, center, slope = max(grid, key=grid.get)
    sample = _familiar_sample(fit.embeddings, sample_size, config.seed)
    chosen = RouterArtifact(artifact.manifest, {**artifact.weights, **sample}).with_fallback(ceiling, center, slope)
    return chosen, {"held_out_benchmarks": held_out, "ceiling": ceiling, "center": center if center > -np.inf else None, "slope": slope,
                    "score": grid[(ceiling, center, slope)], "score_without_fallback": grid[(1.0, -np.inf, 1.0)]}


def fit_router(data: TrainingSet, config: FitConfig = FitConfig(), log=print) -> RouterArtifact:
    """Train FineRouter on `data` (every row is a training row) and return the artifact (not yet saved)."""
    started = time.perf_counter()
    fit, validation = data.validation_split(config.seed, config.validation_fraction)
    stage1, labels, trials = _select_stage1(fit, validation, config)
    log(f"stage 1: {stage1['tasks']} tasks (k={stage1['k']}, mix={stage1['mix']}, resolution={stage1['resolution']}), validation {stage1['validation_score']:.4f}")
    learned, history = _learned_weights(fit, validation, labels, config)
    log(f"stage 2: loss {history['phase1_loss'][0]:.4f} -> {history['phase1_loss'][-1]:.4f} (phase 1), {history['phase2_loss'][-1]:.4f} (phase 2)")

    cost_model = data.cost_model
    weights = {
        **learned,
        "prior_quality": data.table.scores.mean(axis=0),  # the prior router's estimate: every training row
        **_familiar_sample(fit.embeddings, config.familiar_sample, config.seed),
        "cost_per_token": cost_model.per_token,
        "cost_fixed": cost_model.fixed,
    }
    manifest = {
        "embedder": config.embedder,
        "dataset": data.table.name,
        "models": data.table.models,
        "prices": {m: list(p) for m, p in data.table.prices.items()},
        "cost_scale": data.cost_scale,
        "tasks": len(learned["task_quality"]),
        "training_config": {**asdict(config), "network": asdict(replace(config.network, seed=config.seed))},
        "training_rows": len(data.table),
    }
    learned_alone = RouterArtifact(manifest, weights).without_fallback()
    blend, blend_scores = _choose_blend(learned_alone, fit, validation, config)
    artifact, fallback = _choose_fallback(learned_alone.with_blend(blend), data, fit, validation, stage1, config)
    artifact.manifest["validation"] = {
        "score": validation_score(ArtifactRouter(artifact), fit, validation),
        "stage1": stage1,
        "stage1_trials": trials,
        "blend": blend_scores,
        "fallback": fallback,
        "loss_history": history,
    }
    log(f"blend: {blend_scores} -> {blend}; fallback: {fallback}; fitted in {time.perf_counter() - started:.1f}s")
    return artifact
