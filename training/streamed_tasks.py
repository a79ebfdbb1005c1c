"""Stage 1 on a streamed corpus: the kNN graph, then Leiden, each one Ray task on the largest node.

Both read the corpus's shards themselves (the driver never holds the corpus) and use the in-memory fit's code:
`training.neighbours.knn` for the graph (so the method chosen by size is the same) and `training.graph` for the
edge weights, Leiden and the merging of tiny tasks. The edges are written per shard, beside the shards.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from serve.core.prompt_files import filesystem
from training.cluster import use_assigned_cpus, whole_node_task
from training.corpus import Corpus, column_vectors, fixed_lists, read_table, write_table
from training.fit import task_table
from training.graph import community_sums, leiden, merge_by_centroids, task_graph
from training.neighbours import knn, knn_memory

COMPLETE = "_COMPLETE"  # written last into a folder of edge shards


def _embeddings(corpus: Corpus) -> np.ndarray:
    return np.concatenate([corpus.read(shard, ["embedding"])["embedding"] for shard in range(len(corpus.shards))])


def _build_edges(corpus: Corpus, k: int, method: str, seed: int, folder: str) -> dict[str, float]:
    """The kNN graph of every training row, written per shard; returns its seconds by part."""
    use_assigned_cpus()
    started = time.perf_counter()
    embeddings = _embeddings(corpus)
    read = time.perf_counter()
    neighbours, similarities = knn(embeddings, k, method=method, seed=seed)
    del embeddings
    built = time.perf_counter()
    offsets = corpus.offsets
    for shard, name in enumerate(corpus.shards):
        rows = slice(offsets[shard], offsets[shard + 1])
        write_table(f"{folder}/{name}", pa.table({"neighbours": fixed_lists(neighbours[rows]),
                                                   "similarities": fixed_lists(similarities[rows])}))
    return {"knn_read": read - started, "knn_build": built - read, "knn_write": time.perf_counter() - built}


def knn_edges(corpus: Corpus, k: int, *, method: str = "auto", seed: int = 0, seconds: dict | None = None) -> str:
    """Every training row's k nearest other rows, written per shard by one task on the largest node; returns the
    edges' folder (reused when a previous run completed it). `seconds`, when given, gets the task's reading,
    graph build and writing seconds ("knn_read", "knn_build", "knn_write")."""
    import ray

    folder = f"{corpus.folder}/edges-k{k}-{method}-seed{seed}"
    fs, target = filesystem(folder)
    if fs.get_file_info(f"{target}/{COMPLETE}").type == pafs.FileType.File:
        return folder
    fs.create_dir(target, recursive=True)
    build = whole_node_task(_build_edges, memory=knn_memory(corpus.rows, corpus.embedding_dim, k))
    parts = ray.get(build.remote(corpus, k, method, seed, folder))
    with fs.open_output_stream(f"{target}/{COMPLETE}"):
        pass
    if seconds is not None:
        seconds.update(parts)
    return folder


def read_edges(corpus: Corpus, edges: str) -> tuple[np.ndarray, np.ndarray]:
    """The kNN graph `knn_edges` wrote: (neighbours [rows, k], similarities [rows, k]) in row order."""
    parts = [read_table(f"{edges}/{name}", ["neighbours", "similarities"]) for name in corpus.shards]
    return (np.concatenate([column_vectors(p.column("neighbours"), np.int64) for p in parts]),
            np.concatenate([column_vectors(p.column("similarities"), np.float32) for p in parts]))


def _discover(corpus: Corpus, edges: str, mix: float, resolution: float, min_size: int, shrinkage: float,
              seed: int, labels_path: str) -> np.ndarray:
    """Leiden on the whole kNN graph: writes every row's task label, returns the task table [T, M]."""
    neighbours, similarities = read_edges(corpus, edges)
    scores = np.concatenate([corpus.read(shard, ["scores"])["scores"] for shard in range(len(corpus.shards))])
    communities = leiden(task_graph(neighbours, similarities, scores, mix), resolution, seed)
    del neighbours, similarities
    offsets, count = corpus.offsets, communities.max() + 1
    sums = sum(community_sums(communities[offsets[s]:offsets[s + 1]], corpus.read(s, ["embedding"])["embedding"], count)
               for s in range(len(corpus.shards)))
    labels = merge_by_centroids(communities, sums, min_size)
    write_table(labels_path, pa.table({"task": pa.array(labels.astype(np.int32))}))
    return task_table(labels, scores, shrinkage)


def corpus_tasks(corpus: Corpus, edges: str, k: int, *, mix: float, resolution: float, min_size: int,
                   shrinkage: float, seed: int, labels_path: str) -> np.ndarray:
    """Leiden's tasks of the streamed corpus, in one task on the largest node (step 4 of `training.streaming`)."""
    import ray

    discover = whole_node_task(_discover, memory=corpus.rows * (k * 60 + 64))
    return ray.get(discover.remote(corpus, edges, mix, resolution, min_size, shrinkage, seed, labels_path))
