"""A streamed fit: routing data that outgrow one process, trained on as Ray jobs over Parquet shards.

`python -m training fit --input URI` reads a file or folder of a user's routing data (JSON Lines or Parquet,
local or on object storage: whatever pyarrow reads) and never gathers the corpus in the driver, which holds
only per-shard counts and two bounded samples:

1. `training.corpus.embed_corpus`: the training rows embedded into Parquet shards (cached; a crashed run
   resumes at the missing shards), with a validation slice and a sample set apart by a hash of each prompt.
2. Stage 1 settings (kNN degree, mix, Leiden resolution) are chosen on the sample, as `fit_router` chooses
   them on its fit rows.
3. `training.streamed_tasks.knn_edges`: the kNN graph of every training row, by the in-memory fit's
   `training.neighbours.knn`, in one task on the largest node; its edges are written per shard.
4. `training.streamed_tasks.corpus_tasks`: Leiden on one node (igraph's C implementation on large graphs),
   tiny tasks merged by centroids summed shard by shard; it writes every row's task label.
5. Stage 2 on Ray Train, reading the shards with their labels as a Ray Dataset.
6. The blend is chosen on the validation rows and the artifact assembled as `fit_router` assembles it.

On a cluster the workspace (where the shards go) must be storage that every node reads: a shared file system or
object storage.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from serve.core.artifact import RouterArtifact, network_inputs
from serve.core.features import prompt_features
from training.corpus import Corpus, embed_corpus, read_table, shard_items
from training.datasets import DatasetError, RoutingTable
from training.fit import (
    FitConfig,
    _select_stage1,
    assemble_artifact,
    feature_scaling,
    task_candidates,
)
from training.moe import array_dataset, train_with_ray
from training.routers.base import TrainingSet
from training.streamed_tasks import corpus_tasks, knn_edges


def _gather(corpus: Corpus, parts: tuple[str, ...], columns: list[str]) -> list[dict[str, np.ndarray]]:
    """Bounded parts ("validation", "sample") of every shard, read in one pass by one Ray task per shard."""
    import ray

    read = ray.remote(num_cpus=0.25)(lambda shard: [corpus.read(shard, columns, part) for part in parts])
    pieces = ray.get([read.remote(shard) for shard in range(len(corpus.shards))])
    return [{name: np.concatenate([piece[p][name] for piece in pieces]) for name in columns} for p in range(len(parts))]


def _training_set(corpus: Corpus, columns: dict[str, np.ndarray]) -> TrainingSet:
    """Gathered rows as the in-memory fit's TrainingSet."""
    n = len(columns["prompt"])
    table = RoutingTable(name=corpus.name, models=corpus.models, prompt_ids=columns["row"].astype(str).astype(object),
                         prompts=list(columns["prompt"]), benchmarks=columns["benchmark"].astype(object),
                         splits=np.full(n, "train", dtype=object), scores=columns["scores"].astype(np.float64),
                         costs=columns["costs"].astype(np.float64), prompt_tokens=columns["prompt_tokens"])
    return TrainingSet(table, columns["embedding"])


ROW_COLUMNS = ["row", "prompt", "benchmark", "scores", "costs", "prompt_tokens", "embedding"]


class _Stage2Rows:
    """Ray Data map: one shard's network inputs, scores and task labels, for Ray Train."""

    def __init__(self, corpus: Corpus, labels_path: str, scaling: tuple[np.ndarray, np.ndarray]):
        self.corpus, self.scaling, self.offsets = corpus, scaling, corpus.offsets
        self.labels = read_table(labels_path, ["task"]).column("task").to_numpy().astype(np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shard = int(batch["shard"][0])
        rows = self.corpus.read(shard, ["prompt", "embedding", "scores"])
        return {"inputs": network_inputs(rows["embedding"], list(rows["prompt"]), *self.scaling), "scores": rows["scores"],
                "tasks": self.labels[self.offsets[shard]:self.offsets[shard + 1]]}


def fit_streaming(uri: str, config: FitConfig = FitConfig(), *, workspace: str | None = None, embed_actors: int = 1,
                  embed_gpus: float = 0.0, knn_method: str = "auto", log=print) -> RouterArtifact:
    """Train FineRouter on the input at `uri` without gathering it (the module docstring's six steps)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    started = time.perf_counter()
    corpus = embed_corpus(uri, config.embedder, workspace=workspace, validation_fraction=config.validation_fraction,
                          num_actors=embed_actors, num_gpus=embed_gpus, log=log)
    return fit_corpus(corpus, config, workspace=workspace, knn_method=knn_method, log=log,
                      seconds={"embed": time.perf_counter() - started}, source=uri)


def fit_corpus(corpus: Corpus, config: FitConfig = FitConfig(), *, workspace: str | None = None, knn_method: str = "auto", log=print,
               seconds: dict | None = None, source: str | None = None) -> RouterArtifact:
    """Steps 2-6 on an embedded corpus; the artifact's manifest records each step's seconds."""
    import ray

    seconds = dict(seconds or {})
    clock = [time.perf_counter()]

    def lap(step: str) -> float:
        now = time.perf_counter()
        seconds[step], clock[0] = now - clock[0], now
        return seconds[step]

    if corpus.rows <= max(config.ks):
        raise DatasetError(f"{source or corpus.folder}: {corpus.rows} training rows; a kNN graph of degree {max(config.ks)} needs more")
    sample, validation = (_training_set(corpus, rows) for rows in _gather(corpus, ("sample", "validation"), ROW_COLUMNS))
    stage1, _, trials = _select_stage1(sample, validation, config)
    log(f"stage 1 settings on a sample of {len(sample.table)} rows: k={stage1['k']}, mix={stage1['mix']}, "
        f"resolution={stage1['resolution']} ({lap('stage1_settings'):.1f}s)")

    knn_seconds = {}
    edges = knn_edges(corpus, stage1["k"], method=knn_method, seed=config.seed, seconds=knn_seconds)
    log(f"kNN graph of {corpus.rows} rows in {lap('knn'):.1f}s (its build {knn_seconds.get('knn_build', 0):.1f}s)")
    labels_path = f"{edges}/tasks-mix{stage1['mix']}-resolution{stage1['resolution']}-min{config.min_task_size}.parquet"
    table = corpus_tasks(corpus, edges, stage1["k"], mix=stage1["mix"], resolution=stage1["resolution"],
                           min_size=config.min_task_size, shrinkage=config.shrinkage, seed=config.seed, labels_path=labels_path)
    log(f"stage 1: {len(table)} tasks in {lap('tasks'):.1f}s")

    scaling = feature_scaling(prompt_features(sample.table.prompts), config.prompt_features)
    train_rows = shard_items(corpus).map_batches(
        _Stage2Rows, fn_constructor_kwargs={"corpus": corpus, "labels_path": labels_path, "scaling": scaling},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    validation_rows = array_dataset({"inputs": network_inputs(validation.embeddings, validation.table.prompts, *scaling),
                                     "scores": validation.table.scores.astype(np.float32)})
    candidates = task_candidates(table, config.candidate_margin)
    networks = train_with_ray({"train": train_rows, "validation": validation_rows}, candidates, replace(config.network, seed=config.seed),
                              num_workers=config.num_workers, use_gpu=config.use_gpu, checkpoint_every=config.checkpoint_every,
                              storage_path=_checkpoints(workspace))
    log(f"stage 2 on Ray Train in {lap('stage2'):.1f}s")
    streamed = {"input": source, "corpus": corpus.folder, "sample_rows": len(sample.table), "validation_rows": len(validation.table),
                "seconds": seconds, "knn_seconds": knn_seconds}
    artifact = assemble_artifact(networks, table, scaling, sample, sample, validation, config,
                                 {"stage1": stage1, "stage1_trials": trials, "streamed": streamed}, log, training_rows=corpus.rows)
    lap("blend")
    return artifact


def _checkpoints(workspace: str | None) -> str | None:
    """Ray Train's checkpoints beside the shards where the workspace is shared storage (a URI)."""
    return f"{workspace}/checkpoints" if workspace and "://" in workspace else None

