"""Change a trained router's pool without retraining it: add a model from a few labelled prompts, remove a model,
change a model's price.

Onboarding uses what Stage 1 already knows. The new model's column of the task table is its mean label per
latent task (labels weighted by p(task | prompt)), shrunk toward a prior: a regression of its labels on the
pool's task profiles, so that a task where the models it resembles do well starts high (UniRoute represents a
model by its per-cluster errors on a few prompts; ZeroRouter profiles a new model on ~100 anchor prompts). Its
mixture-of-experts head is that task table in logit space, gated by the artifact's own task classifier, plus
an optional correction by the pool's heads fitted on the labels (a prompt that the pool finds hard is likely
hard for the new model too). Every array of the other models is copied unchanged, so their estimates, and the
blend, stay exactly as trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from serve.core.artifact import RouterArtifact
from serve.core.decision import CostModel
from serve.core.posthoc import logit

MILLION = 1e6  # prices are USD per 1M tokens


@dataclass(frozen=True)
class OnboardConfig:
    """How a new model's estimates are formed from its labels (the defaults are chosen on validation slices by
    benchmarks/bench_onboard.py; docs/own_pool_onboard.md has the comparison)."""

    shrinkage: float = 100.0  # labels' worth of the prior mixed into each task's mean label
    profile_ridge: float | None = 10.0  # ridge of the labels' regression on the pool's scores; None: the prior is the mean label
    pool_scores: bool = True  # regress on the pool's own scores of the labelled prompts where the labels have them
    head_ridge: float | None = 30.0  # ridge of the head's correction by the pool's heads; None: the head is the task table alone


@dataclass
class Labels:
    """The new model's labelled prompts: what the labelling job wrote for it."""

    embeddings: np.ndarray  # [N, D] with the artifact's embedder
    texts: list[str]
    prompt_tokens: np.ndarray  # [N]
    scores: np.ndarray  # [N] quality in [0, 1]
    costs: np.ndarray | None = None  # [N] USD per query; None: priced from the model's prices instead
    pool_scores: np.ndarray | None = None  # [N, M] the pool's scores of the same prompts, where known (pool order)


def _column(artifact: RouterArtifact, model: str) -> int:
    if model not in artifact.models:
        raise ValueError(f"model {model!r} is not in the artifact's pool {artifact.models}")
    return artifact.models.index(model)


def task_quality_column(tasks: np.ndarray, scores: np.ndarray, pool_table: np.ndarray, config: OnboardConfig,
                        pool_scores: np.ndarray | None = None) -> np.ndarray:
    """[T] the new model's quality per task from its labels: `tasks` [N, T] p(task | prompt) of the labelled
    prompts, `scores` [N], `pool_table` [T, M] the pool's task table, `pool_scores` [N, M] the pool's own scores
    of the labelled prompts where known.

    The prior of task t is a ridge regression of the labels on what the pool did on the same prompts (its scores,
    or, without them, its task table's expectation), evaluated at the task's profile `pool_table[t]`: the new
    model resembles some pool models more than others. Each task then adds its labels' residuals from that
    regression, shrunk by `shrinkage` labels' worth: where a few sampled prompts happen to be hard for the pool
    too, the residuals, not the raw labels, say how the new model differs."""
    mean = scores.mean()
    features = pool_scores if pool_scores is not None and config.pool_scores else tasks @ pool_table
    centre = features.mean(axis=0)
    weights = np.zeros(pool_table.shape[1])
    if config.profile_ridge is not None:
        design = features - centre
        weights = np.linalg.solve(design.T @ design + config.profile_ridge * np.eye(design.shape[1]), design.T @ (scores - mean))
    prior = mean + (pool_table - centre) @ weights
    residuals = scores - (mean + (features - centre) @ weights)
    return np.clip(prior + tasks.T @ residuals / (tasks.sum(axis=0) + config.shrinkage), 0.0, 1.0)


def pool_head_correction(pool_logits: np.ndarray, base_logits: np.ndarray, scores: np.ndarray, ridge: float,
                         iterations: int = 25) -> tuple[np.ndarray, float]:
    """(weights [M], offset): the ridge logistic regression of the labels on the pool's MoE logits (centred),
    on top of `base_logits` (the task table's). Newton's method: a handful of parameters, a few hundred labels."""
    centre = pool_logits.mean(axis=0)
    design = pool_logits - centre
    weights = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(base_logits + design @ weights, -35, 35)))
        gradient = design.T @ (p - scores) + ridge * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge * np.eye(len(weights))
        weights -= np.linalg.solve(hessian, gradient)
    return weights, float(-centre @ weights)


def _head_arrays(artifact: RouterArtifact, table_column: np.ndarray, weights: np.ndarray, offset: float) -> dict[str, np.ndarray]:
    """The new model's MoE arrays: logit = sum_t p(t | x) logit(Q[t, new]) + sum_j weights[j] logit_j(x) + offset,
    written in the artifact's own head format (general and task heads), so serving needs no new code."""
    w = artifact.weights
    gated = w["candidates"]  # [T, M]: the pool's task heads count only on their tasks' candidates
    return {
        "general_w": w["general_w"] @ weights,
        "general_b": np.float32(w["general_b"] @ weights + offset),
        "task_w": np.einsum("thm,tm,m->th", w["task_w"], gated, weights),
        "task_b": (w["task_b"] * gated) @ weights + logit(table_column),
        "candidates": np.float32(1.0),  # the task heads carry the task table: every task
    }


def _append(weights: dict[str, np.ndarray], name: str, value) -> np.ndarray:
    """The array `name` with one more model: `value` appended along the model axis (the last)."""
    array = weights[name]
    value = np.broadcast_to(np.asarray(value, array.dtype), array.shape[:-1])
    return np.concatenate([array, value[..., None]], axis=-1)


def output_tokens(artifact: RouterArtifact) -> float:
    """Expected output tokens per query, read back from the pool's cost model (fixed cost / output price)."""
    prices = artifact.manifest.get("prices") or {}
    fixed = artifact.weights["cost_fixed"]
    tokens = [fixed[j] * MILLION / prices[m][1] for j, m in enumerate(artifact.models) if m in prices and prices[m][1] > 0]
    if not tokens:
        raise ValueError("the artifact records no output prices (its training data had per-query costs), so a price cannot be "
                         "turned into a cost per query: onboard from labels with a 'costs' column (USD per query), or refit")
    return float(np.median(tokens))


def priced_cost(artifact: RouterArtifact, input_price: float, output_price: float) -> CostModel:
    """A one-model cost model from prices (USD per 1M tokens) and the pool's expected output tokens."""
    return CostModel(per_token=np.array([input_price / MILLION]), fixed=np.array([output_tokens(artifact) * output_price / MILLION]))


def label_evidence(artifact: RouterArtifact, labels: Labels) -> tuple[np.ndarray, np.ndarray]:
    """What the artifact says about the labelled prompts: ([N, M] the pool's MoE logits, [N, T] p(task | prompt))."""
    return artifact.moe_logits(artifact.inputs(labels.embeddings, labels.texts))


def onboard(artifact: RouterArtifact, model: str, labels: Labels, config: OnboardConfig = OnboardConfig(),
            prices: tuple[float, float] | None = None, evidence: tuple[np.ndarray, np.ndarray] | None = None) -> RouterArtifact:
    """The artifact with `model` added from its `labels`; every other model's arrays unchanged. The cost model
    comes from the labels' costs, or from `prices` (USD per 1M input, output tokens). `evidence`: the labels'
    `label_evidence`, where already computed."""
    if model in artifact.models:
        raise ValueError(f"model {model!r} is already in the pool; remove it first to onboard it again")
    if len(labels.scores) == 0:
        raise ValueError(f"no labelled prompts for {model!r}")
    scores = np.asarray(labels.scores, float)
    pool_logits, tasks = label_evidence(artifact, labels) if evidence is None else evidence
    column = task_quality_column(tasks, scores, artifact.weights["task_quality"], config, labels.pool_scores)
    weights, offset = np.zeros(len(artifact.models)), 0.0
    if config.head_ridge is not None:
        weights, offset = pool_head_correction(pool_logits, tasks @ logit(column), scores, config.head_ridge)
    if prices is not None:
        cost = priced_cost(artifact, *prices)
    elif labels.costs is not None and np.any(labels.costs > 0):
        cost = CostModel.fit(np.asarray(labels.prompt_tokens), np.asarray(labels.costs, float)[:, None])
    else:
        raise ValueError(f"the labels of {model!r} record no costs: give its prices (USD per 1M input and output tokens)")
    new = dict(artifact.weights)
    for name, value in _head_arrays(artifact, column, weights, offset).items():
        new[name] = _append(new, name, value)
    new["task_quality"] = _append(new, "task_quality", column)
    new["cost_per_token"] = _append(new, "cost_per_token", cost.per_token[0])
    new["cost_fixed"] = _append(new, "cost_fixed", cost.fixed[0])
    manifest = {key: value for key, value in artifact.manifest.items() if key not in ("posthoc", "checksums")}
    manifest["models"] = [*artifact.models, model]
    if prices is not None:
        manifest["prices"] = {**manifest.get("prices", {}), model: list(prices)}
    manifest["onboarded"] = {**artifact.manifest.get("onboarded", {}), model: {
        "labels": len(scores), "mean_label": float(scores.mean()), "config": asdict(config)}}
    if "posthoc" in artifact.manifest:
        # The post-hoc estimator is fitted on every model's recorded answers; it has none for the new model.
        manifest["posthoc_dropped"] = "onboarding adds a model the post-hoc estimator has no answers for: refit to judge answers"
    return RouterArtifact(manifest, {name: value for name, value in new.items() if not name.startswith("posthoc_")})


def remove_model(artifact: RouterArtifact, model: str) -> RouterArtifact:
    """The artifact without `model`: its column dropped from every per-model array (the post-hoc estimator's
    too), nothing refitted, so the other models rank exactly as before."""
    keep = np.arange(len(artifact.models)) != _column(artifact, model)
    if keep.sum() < 1:
        raise ValueError(f"{model!r} is the pool's only model")
    weights = dict(artifact.weights)
    for name in ("general_w", "general_b", "task_w", "task_b", "candidates", "task_quality", "cost_per_token", "cost_fixed"):
        weights[name] = weights[name][..., keep]
    manifest = {key: value for key, value in artifact.manifest.items() if key != "checksums"}
    manifest["models"] = [m for m in artifact.models if m != model]
    manifest["prices"] = {m: p for m, p in manifest.get("prices", {}).items() if m != model}
    if "posthoc" in manifest:
        weights |= {f"posthoc_{name}": weights[f"posthoc_{name}"][keep] for name in ("answer_weights", "resolution")}
        prior = weights["posthoc_prior_weights"]
        weights["posthoc_prior_weights"] = np.concatenate([prior[:-2][keep], prior[-2:]])
        combine = weights["posthoc_combine_weights"]  # per-model intercepts first
        weights["posthoc_combine_weights"] = np.concatenate([combine[:len(keep)][keep], combine[len(keep):]])
    return RouterArtifact(manifest, weights)


def reprice(artifact: RouterArtifact, model: str, input_price: float, output_price: float) -> RouterArtifact:
    """The artifact with `model` at new prices (USD per 1M input, output tokens). The cost weight's unit
    (`cost_scale`) stays, so a preset keeps trading the same quality for the same dollars."""
    cost = priced_cost(artifact, input_price, output_price)
    column = _column(artifact, model)
    weights = dict(artifact.weights)
    for name, value in (("cost_per_token", cost.per_token[0]), ("cost_fixed", cost.fixed[0])):
        weights[name] = weights[name].copy()
        weights[name][column] = value
    manifest = {key: value for key, value in artifact.manifest.items() if key != "checksums"}
    manifest["prices"] = {**manifest.get("prices", {}), model: [input_price, output_price]}
    return RouterArtifact(manifest, weights)


def read_labels(path, model: str, artifact: RouterArtifact) -> Labels:
    """The labelled prompts of `model` from a routing table file (JSONL or Parquet in the user format, as the
    labelling job writes it: `prompt`, `scores`, optional `costs`). Where `scores` also holds every model of the
    artifact's pool (prompts of the training table, or labelled for the whole pool), those scores say which pool
    models the new one resembles; other columns are ignored."""
    from training.datasets import DatasetError, load_dataset
    from training.embed import embed_texts

    embedder = artifact.embedder
    table = load_dataset(str(path), embedder=embedder)
    if model not in table.models:
        raise DatasetError(f"{path}: column 'scores' has no model {model!r} (it has {table.models})")
    column = table.models.index(model)
    costs = table.costs[:, column]
    pool_scores = None
    if set(artifact.models) <= set(table.models):
        pool_scores = table.scores[:, [table.models.index(m) for m in artifact.models]]
    return Labels(embeddings=embed_texts(table.prompts, embedder, use_ray=False), texts=table.prompts, prompt_tokens=table.prompt_tokens,
                  scores=table.scores[:, column], costs=costs if np.any(costs > 0) else None, pool_scores=pool_scores)
