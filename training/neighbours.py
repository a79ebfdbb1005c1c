"""The kNN graph of prompt embeddings: each row's k nearest other rows by cosine, built directly.

Methods (`knn`'s `method`; "auto" picks one by size in `resolve_method`, the one place that choice is made):
- "exact": faiss's flat inner-product search (on the GPUs where faiss has them).
- "ivf": an IVF self-join. k-means splits the rows into about IVF_LISTS_PER_SQRT_ROW * sqrt(N) lists; each row
  is compared, exactly, with the members of its IVF_PROBES nearest lists (one faiss.knn per list, all of that
  list's probing rows against its members) and the candidates are merged into its top k. No index is kept and
  there is no separate query pass; with lists of about sqrt(N) rows the work grows as IVF_PROBES * N^1.5.
- "nndescent": faiss's NN-Descent graph (`IndexNNDescentFlat`), read straight from the index.
- "hnsw": an HNSW index, then every row queried against it (the method before the self-join; for comparison).
- "torch": exact, by blocked matrix products in torch (`training.exact_knn`), for a GPU without GPU faiss.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from training.exact_knn import torch_knn

METHODS = ("auto", "exact", "ivf", "nndescent", "hnsw", "torch")
EXACT_BELOW_ROWS = 100_000

# IVF self-join: sqrt(N) lists, k-means on a sample of 40 rows per list, each row joined with its 24 nearest lists
# (chosen on synthetic data: benchmarks/bench_graph.py, docs/graph.md).
IVF_LISTS_PER_SQRT_ROW = 1
IVF_TRAINING_ROWS_PER_LIST = 40
IVF_KMEANS_ITERATIONS = 10
IVF_PROBES = 24
MERGE_ROWS = 100_000  # rows whose candidates are merged per step

# NN-Descent: the graph keeps NNDESCENT_DEGREE_FACTOR * k neighbours per row while it refines, then the best k.
NNDESCENT_DEGREE_FACTOR = 2
NNDESCENT_ITERATIONS = 10
NNDESCENT_MIN_ROWS = 101  # faiss's NN-Descent refuses fewer (it sets 100 rows apart to estimate its recall)

HNSW_LINKS_PER_NODE = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 24


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _torch_gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_method(method: str, rows: int) -> str:
    """"auto": exact below EXACT_BELOW_ROWS rows; above, the IVF self-join on CPU, and an exact search on a GPU
    (faiss's flat index where faiss has GPUs, else torch: a GPU multiplies a million rows by a million in seconds)."""
    if method not in METHODS:
        raise ValueError(f"unknown kNN method {method!r}: use one of {METHODS}")
    if method != "auto":
        return method
    if rows < EXACT_BELOW_ROWS or _gpu_available():
        return "exact"
    return "torch" if _torch_gpu_available() else "ivf"


def _drop_self(similarities: np.ndarray, neighbours: np.ndarray, rows: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """From k + 1 hits per row, the k other than the row itself (or the last hit, where the row is missing:
    more than k exact duplicates, or an approximate search that missed it). Missing hits: id -1, similarity 0."""
    drop = neighbours == rows[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    neighbours = neighbours[keep].reshape(len(rows), k)
    similarities = similarities[keep].reshape(len(rows), k)
    similarities[neighbours < 0] = 0.0
    return neighbours.astype(np.int64), similarities.astype(np.float32)


def _search_all(index: faiss.Index, embeddings: np.ndarray, k: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row queried against an index holding every row, `block_size` rows per faiss call."""
    answers = []
    for start in range(0, len(embeddings), block_size):
        rows = np.arange(start, min(start + block_size, len(embeddings)))
        answers.append(_drop_self(*index.search(embeddings[rows], k + 1), rows, k))
    return np.concatenate([ids for ids, _ in answers]), np.concatenate([sims for _, sims in answers])


def exact_knn(embeddings: np.ndarray, k: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    if _gpu_available():
        index = faiss.index_cpu_to_all_gpus(index)
    return _search_all(index, embeddings, k, block_size)


def hnsw_knn(embeddings: np.ndarray, k: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """An HNSW index over every row, then every row queried against it (its multithreaded build is not
    bit-for-bit reproducible)."""
    index = faiss.IndexHNSWFlat(embeddings.shape[1], HNSW_LINKS_PER_NODE, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(embeddings)
    return _search_all(index, embeddings, k, block_size)


def ivf_lists(rows: int) -> int:
    """The self-join's list count: about IVF_LISTS_PER_SQRT_ROW * sqrt(rows), with at least
    IVF_TRAINING_ROWS_PER_LIST rows per list for k-means."""
    return max(1, min(rows // IVF_TRAINING_ROWS_PER_LIST, round(IVF_LISTS_PER_SQRT_ROW * math.sqrt(rows))))


def ivf_self_join(embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The IVF self-join of the module docstring; `seed` fixes k-means, so the result is reproducible.

    The lists are joined on a pool of threads, one faiss thread each: a list is a small search, and faiss's
    OpenMP threads spin-wait between such searches, which costs more than the search on shared cores."""
    rows, dim = embeddings.shape
    lists = ivf_lists(rows)
    probes = min(IVF_PROBES, lists)
    kmeans = faiss.Kmeans(dim, lists, niter=IVF_KMEANS_ITERATIONS, spherical=True, seed=seed,
                          max_points_per_centroid=IVF_TRAINING_ROWS_PER_LIST, min_points_per_centroid=1)
    kmeans.train(embeddings)
    _, nearest_lists = kmeans.index.search(embeddings, probes)  # [rows, probes], the nearest list first
    members_by_list = np.argsort(nearest_lists[:, 0], kind="stable")
    member_starts = np.searchsorted(nearest_lists[:, 0], np.arange(lists + 1), sorter=members_by_list)
    probing = np.argsort(nearest_lists.ravel(), kind="stable")  # (row, probe) pairs grouped by list
    probing_starts = np.searchsorted(nearest_lists.ravel(), np.arange(lists + 1), sorter=probing)
    del nearest_lists
    hits = k + 1  # the row itself is among its own list's hits
    candidate_ids = np.full((rows, probes, hits), -1, dtype=np.int32)
    candidate_similarities = np.full((rows, probes, hits), -np.inf, dtype=np.float32)

    def join(current: int) -> None:
        members = members_by_list[member_starts[current]:member_starts[current + 1]]
        pairs = probing[probing_starts[current]:probing_starts[current + 1]]
        if len(members) == 0 or len(pairs) == 0:
            return
        queries, probe = pairs // probes, pairs % probes
        found = min(hits, len(members))
        similarities, local = faiss.knn(embeddings[queries], embeddings[members], found, metric=faiss.METRIC_INNER_PRODUCT)
        candidate_ids[queries, probe, :found] = members[local]
        candidate_similarities[queries, probe, :found] = similarities

    threads = faiss.omp_get_max_threads()
    with ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
        list(pool.map(join, range(lists)))
    candidate_ids = candidate_ids.reshape(rows, probes * hits)
    candidate_similarities = candidate_similarities.reshape(rows, probes * hits)
    neighbours = np.empty((rows, k), dtype=np.int64)
    similarities = np.empty((rows, k), dtype=np.float32)
    for start in range(0, rows, MERGE_ROWS):  # in blocks: the selection's temporaries are as large as its input
        block = slice(start, min(start + MERGE_ROWS, rows))
        ids, sims = candidate_ids[block], candidate_similarities[block]
        sims[ids == np.arange(block.start, block.stop)[:, None]] = -np.inf  # the row itself
        neighbours[block], similarities[block] = _best_k(ids, sims, k)
    return neighbours, similarities


def _best_k(candidate_ids: np.ndarray, candidate_similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar candidates, best first; a row with fewer than k gets id -1, similarity 0."""
    top = np.argpartition(-candidate_similarities, k - 1, axis=1)[:, :k]
    similarities = np.take_along_axis(candidate_similarities, top, axis=1)
    order = np.argsort(-similarities, axis=1, kind="stable")
    neighbours = np.take_along_axis(np.take_along_axis(candidate_ids, top, axis=1), order, axis=1)
    similarities = np.take_along_axis(similarities, order, axis=1)
    missing = ~np.isfinite(similarities)
    neighbours[missing], similarities[missing] = -1, 0.0
    return neighbours.astype(np.int64), similarities.astype(np.float32)


def nndescent_knn(embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's NN-Descent graph of NNDESCENT_DEGREE_FACTOR * k neighbours per row, cut to the best k (an exact
    search below NNDESCENT_MIN_ROWS rows)."""
    rows, dim = embeddings.shape
    if rows < NNDESCENT_MIN_ROWS:
        return exact_knn(embeddings, k, rows)
    degree = min(rows - 1, NNDESCENT_DEGREE_FACTOR * k)
    index = faiss.IndexNNDescentFlat(dim, degree, faiss.METRIC_INNER_PRODUCT)
    index.nndescent.iter = NNDESCENT_ITERATIONS
    index.nndescent.random_seed = seed
    index.add(embeddings)
    graph = faiss.vector_to_array(index.nndescent.final_graph).reshape(rows, degree).astype(np.int64)
    valid = (graph >= 0) & (graph != np.arange(rows)[:, None])
    similarities = np.einsum("rd,rkd->rk", embeddings, embeddings[np.maximum(graph, 0)])
    return _best_k(graph, np.where(valid, similarities, -np.inf).astype(np.float32), k)


def knn(embeddings: np.ndarray, k: int, *, method: str = "auto", use_ray: bool = False, block_size: int = 20000,
        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine: (ids [N, k] int64, similarities [N, k] float32), best first.

    `embeddings` must be L2-normalised, so inner product = cosine. `method`: see the module docstring; "auto"
    chooses by size (`resolve_method`). `use_ray=True` builds the graph in one Ray task on the cluster's largest
    node with all its CPUs (the driver then needs no room for the build), with the same result. `seed` fixes
    the randomised methods' choices; `block_size` is the rows per search call of the index-based methods.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = len(embeddings)
    if not 0 < k < rows:
        raise ValueError(f"k must be in [1, {rows - 1}] for {rows} rows, got {k}")
    if use_ray:
        return knn_on_a_node(embeddings, k, method=method, block_size=block_size, seed=seed)
    chosen = resolve_method(method, rows)
    if chosen == "ivf":
        return ivf_self_join(embeddings, k, seed)
    if chosen == "nndescent":
        return nndescent_knn(embeddings, k, seed)
    if chosen == "hnsw":
        return hnsw_knn(embeddings, k, block_size)
    if chosen == "torch":
        return torch_knn(embeddings, k, block_size=block_size)
    return exact_knn(embeddings, k, block_size)


def knn_memory(rows: int, dim: int, k: int) -> int:
    """Bytes a graph build of `rows` rows needs at most: the rows, a copy, and the self-join's candidates."""
    return rows * (2 * dim * 4 + IVF_PROBES * (k + 1) * 8 + k * 12)


def _knn_in_task(embeddings: np.ndarray, k: int, method: str, block_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from training.cluster import use_assigned_cpus

    use_assigned_cpus()
    return knn(embeddings, k, method=method, block_size=block_size, seed=seed)


def knn_on_a_node(embeddings: np.ndarray, k: int, *, method: str, block_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`knn` in one Ray task on the largest node (starting Ray here if it is not running)."""
    import ray

    from training.cluster import whole_node_task

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False)  # joins the machine's running cluster if there is one, else starts one
    try:
        task = whole_node_task(_knn_in_task, memory=knn_memory(*embeddings.shape, k))
        return ray.get(task.remote(embeddings, k, method, block_size, seed))
    finally:
        if started_ray:
            ray.shutdown()
