"""Stage 1 task discovery, graph part: kNN graph of prompt embeddings -> Leiden communities = latent tasks.

Edge weights mix semantic similarity (cosine of the embeddings) with performance similarity (how alike two
prompts rank the models by score), so that a task groups prompts that read alike *and* favour the same
models. Everything here is plain numpy/faiss/igraph; Ray only shards the kNN queries when asked to.
"""

from __future__ import annotations

import math
import random

import faiss
import igraph
import leidenalg
import numpy as np

from training.exact_knn import torch_knn

INDEX_KINDS = ("auto", "exact", "ivf", "hnsw", "torch")
EXACT_BELOW_ROWS = 100_000

# Approximate indexes, chosen with benchmarks/bench_graph.py on MiniLM-like data (figures in docs/scaling.md).
HNSW_LINKS_PER_NODE = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 24
# IVF-Flat: 2 * sqrt(N) lists, k-means on a seeded sample of 40 rows per list; 32 probes (16 lose recall).
IVF_LISTS_PER_SQRT_ROW = 2
IVF_TRAINING_ROWS_PER_LIST = 40
IVF_KMEANS_ITERATIONS = 10
IVF_PROBES = 32

# Ray path: faiss threads per query actor; fewer, wider actors hold fewer copies of the index.
QUERY_ACTOR_CPUS = 4
# Pairs of prompts scored per rank_biased_overlap call, bounding its temporary arrays.
PERFORMANCE_SIMILARITY_CHUNK = 200_000
# Tiny communities matched to their nearest large one per call of merge_small_communities' loop.
MERGE_CHUNK = 4096
# Leiden: leidenalg below this many nodes, igraph's C implementation (same objective, several times faster
# on large graphs: benchmarks/bench_graph.py --leiden) from it on.
LEIDEN_IMPLEMENTATIONS = ("auto", "leidenalg", "igraph")
LEIDEN_IGRAPH_FROM_NODES = 100_000


def use_assigned_cpus() -> None:
    """Give faiss's OpenMP threads the CPUs Ray assigned to this task or actor: Ray starts its workers with one
    OpenMP thread, which would leave a multi-CPU index build or search on one core."""
    import ray

    faiss.omp_set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _torch_gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_index_kind(index: str, rows: int) -> str:
    """"auto": exact below EXACT_BELOW_ROWS rows; above, HNSW on CPU (the fastest at recall@10 >= 0.9),
    IVF-Flat where faiss has a GPU (faiss has no GPU HNSW), and an exact torch search where there is a GPU
    but faiss has no GPU support (a GPU multiplies a million rows by a million in seconds)."""
    if index not in INDEX_KINDS:
        raise ValueError(f"unknown index {index!r}: use one of {INDEX_KINDS}")
    if index != "auto":
        return index
    if rows < EXACT_BELOW_ROWS:
        return "exact"
    if _gpu_available():
        return "ivf"
    return "torch" if _torch_gpu_available() else "hnsw"


def build_index(embeddings: np.ndarray, kind: str, seed: int, *, rows: int | None = None, add: bool = True) -> faiss.Index:
    """A CPU inner-product index holding every row (GPU copies are made where the queries run).

    A streamed corpus builds it in parts: `embeddings` is then a sample that trains IVF's lists, `rows` the
    corpus's size (which sizes them) and `add=False` leaves the rows to be added shard by shard."""
    rows, dim = (len(embeddings) if rows is None else rows), embeddings.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS_PER_NODE, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        lists = max(1, min(rows // IVF_TRAINING_ROWS_PER_LIST, round(IVF_LISTS_PER_SQRT_ROW * math.sqrt(rows))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the unit sphere, like the rows
        index.cp.seed = seed
        index.cp.niter = IVF_KMEANS_ITERATIONS
        training_rows = min(len(embeddings), IVF_TRAINING_ROWS_PER_LIST * lists)
        sample = np.sort(np.random.default_rng(seed).choice(len(embeddings), size=training_rows, replace=False))
        index.train(embeddings[sample])
        index.nprobe = min(IVF_PROBES, lists)
    if add:
        index.add(embeddings)
    return index


def on_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Flat and IVF indexes move to all visible GPUs when faiss has GPU support; HNSW has no GPU version."""
    if not _gpu_available() or isinstance(index, faiss.IndexHNSW):
        return index
    return faiss.index_cpu_to_all_gpus(index)


def query_block(index: faiss.Index, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of `queries` (the index's rows `rows`) other than the row itself.

    Asks for k + 1 and drops the row itself, or the last hit when the row is missing (more than k exact
    duplicates, or an approximate index that missed it). Rows an approximate index finds fewer than k
    neighbours for are padded with id -1 and similarity 0.
    """
    similarities, neighbours = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1)
    drop = neighbours == rows[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    neighbours = neighbours[keep].reshape(len(rows), k)
    similarities = similarities[keep].reshape(len(rows), k)
    similarities[neighbours < 0] = 0.0
    return neighbours.astype(np.int64), similarities.astype(np.float32)


def _row_blocks(rows: int, block_size: int) -> list[np.ndarray]:
    """The same row blocks for the plain and the Ray path, so both run identical faiss searches."""
    return [np.arange(start, min(start + block_size, rows)) for start in range(0, rows, block_size)]


class _IndexShard:
    """Ray Data actor: deserialises the shared index once, then answers the kNN queries of its row blocks."""

    def __init__(self, shared: dict, k: int):
        import ray

        use_assigned_cpus()
        self.index = on_gpu_if_available(faiss.deserialize_index(ray.get(shared["index"])))
        self.embeddings = ray.get(shared["embeddings"])
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        neighbours, similarities = query_block(self.index, self.embeddings[batch["data"]], batch["data"], self.k)
        return {"row": batch["data"], "neighbours": neighbours, "similarities": similarities}


def _query_with_ray(index: faiss.Index, embeddings: np.ndarray, k: int, block_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Query every row on an actor pool; the index and embeddings go to the object store once."""
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False)  # joins the machine's running cluster if there is one, else starts one
    try:
        # Nested in a dict, the references reach the actors unresolved and each actor fetches them once.
        serialized_index = faiss.serialize_index(index)
        index_bytes = serialized_index.nbytes
        shared = {"index": ray.put(serialized_index), "embeddings": ray.put(embeddings)}
        del serialized_index  # the object store has it now
        blocks = _row_blocks(len(embeddings), block_size)
        resources = ray.cluster_resources()
        use_gpu = _gpu_available() and resources.get("GPU", 0) > 0
        largest_node = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
        cpus_per_actor = 1 if use_gpu else max(1, min(QUERY_ACTOR_CPUS, int(largest_node)))  # an actor must fit on a node
        max_actors = int(resources["GPU"]) if use_gpu else int(resources.get("CPU", 1)) // cpus_per_actor
        answered = ray.data.from_numpy(blocks).map_batches(
            _IndexShard,
            fn_constructor_kwargs={"shared": shared, "k": k},
            batch_size=block_size,  # = the blocks above, so no batch straddles two of them
            batch_format="numpy",
            # Each actor holds a copy of the index: reserve its memory so a node takes only what fits.
            compute=ray.data.ActorPoolStrategy(size=max(1, min(len(blocks), max_actors))),  # every node's share, from the start
            num_cpus=cpus_per_actor,
            num_gpus=1 if use_gpu else None,
            memory=index_bytes,
        )
        neighbours = np.empty((len(embeddings), k), dtype=np.int64)
        similarities = np.empty((len(embeddings), k), dtype=np.float32)
        for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
            neighbours[batch["row"]] = batch["neighbours"]
            similarities[batch["row"]] = batch["similarities"]
        return neighbours, similarities
    finally:
        if started_ray:
            ray.shutdown()


def knn(embeddings: np.ndarray, k: int, *, index: str = "auto", use_ray: bool = False,
        block_size: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine: (ids [N, k] int64, similarities [N, k] float32).

    `embeddings` must be L2-normalised, so inner product = cosine. `index`: "exact" (IndexFlatIP), "ivf"
    (IVF-Flat), "hnsw", "torch" (exact, `training.exact_knn.torch_knn`, in this process) or "auto" (see
    `resolve_index_kind`). The index is built once; queries run in
    blocks of `block_size` rows, here or (`use_ray=True`) on a Ray Data actor pool, with identical results.
    `seed` fixes IVF's training sample, so "exact" and "ivf" are reproducible; HNSW's multithreaded build is
    not bit-for-bit (pass index="ivf" where that matters more than HNSW's lower CPU time: docs/scaling.md).
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = len(embeddings)
    if not 0 < k < rows:
        raise ValueError(f"k must be in [1, {rows - 1}] for {rows} rows, got {k}")
    kind = resolve_index_kind(index, rows)
    if kind == "torch":
        return torch_knn(embeddings, k, block_size=block_size)
    cpu_index = build_index(embeddings, kind, seed)
    if use_ray:
        return _query_with_ray(cpu_index, embeddings, k, block_size)
    searched = on_gpu_if_available(cpu_index)
    answers = [query_block(searched, embeddings[block], block, k) for block in _row_blocks(rows, block_size)]
    return np.concatenate([ids for ids, _ in answers]), np.concatenate([sims for _, sims in answers])


def _top_membership(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row and model, the rank span [first, last) its tie group occupies when sorted best first."""
    first = np.zeros(scores.shape, dtype=np.int32)
    last = np.zeros(scores.shape, dtype=np.int32)
    for model in range(scores.shape[1]):
        other = scores[:, model:model + 1]
        first += other > scores
        last += other >= scores
    return first, last


def rank_biased_overlap(scores_a: np.ndarray, scores_b: np.ndarray, p: float = 0.9) -> np.ndarray:
    """Performance similarity of prompt pairs: rank-biased overlap of the model rankings, in [0, 1].

    Row i of `scores_a` and of `scores_b` (prompts x models, higher = better) form one pair. RBO compares
    the sets of top-d models at every depth d, weighting depth d by p^(d-1), so agreement on the best
    models counts most; the tail beyond the last depth is extrapolated (RBO_ext), so identical rankings
    score exactly 1.

    Ties (most scores are 0/1) are handled by fractional membership: a model in a tie group spanning ranks
    [first, last) is a fraction clip((d - first) / (last - first), 0, 1) inside the top d, its expected
    membership under a random tie break; the overlap at depth d sums, per model, the smaller of its two
    memberships. So identical score vectors give 1 (including two fully tied rows: a prompt that every
    model solves and one that none solves favour no model, and routing treats them alike), and a fully
    tied row against a strict ranking gives the expected overlap of a random ranking.
    """
    scores_a = np.asarray(scores_a, dtype=np.float64)
    scores_b = np.asarray(scores_b, dtype=np.float64)
    if scores_a.shape != scores_b.shape or scores_a.ndim != 2:
        raise ValueError(f"need two [pairs, models] arrays of one shape: {scores_a.shape}, {scores_b.shape}")
    models = scores_a.shape[1]
    first_a, last_a = _top_membership(scores_a)
    first_b, last_b = _top_membership(scores_b)
    weighted_agreement = np.zeros(len(scores_a))
    for depth in range(1, models + 1):
        inside_a = np.clip((depth - first_a) / (last_a - first_a), 0.0, 1.0)
        inside_b = np.clip((depth - first_b) / (last_b - first_b), 0.0, 1.0)
        agreement = np.minimum(inside_a, inside_b).sum(axis=1) / depth
        weighted_agreement += (1 - p) * p ** (depth - 1) * agreement
    # At the last depth both top sets hold every model (agreement 1): the extrapolated tail is p^models.
    return weighted_agreement + p ** models


def task_graph(neighbours: np.ndarray, similarities: np.ndarray, scores: np.ndarray | None,
               mix: float) -> igraph.Graph:
    """Undirected kNN graph with edge attribute "weight" = (1 - mix) * cosine + mix * rank_biased_overlap.

    i->j and j->i become one edge (their cosines agree up to float rounding; the first is kept), missing
    neighbours (-1) and self loops are dropped, and negative weights are clipped to 0. `scores` None or
    `mix` 0 gives a purely semantic graph.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    rows, k = neighbours.shape
    source = np.repeat(np.arange(rows, dtype=np.int64), k)
    target = neighbours.ravel().astype(np.int64)
    valid = (target >= 0) & (target != source)
    low = np.minimum(source[valid], target[valid])
    high = np.maximum(source[valid], target[valid])
    _, first = np.unique(low * rows + high, return_index=True)
    edges = np.stack([low[first], high[first]], axis=1).astype(np.int32)
    weights = similarities.ravel()[valid][first].astype(np.float64)
    if scores is not None and mix > 0:
        performance = np.concatenate([
            rank_biased_overlap(scores[edges[start:start + PERFORMANCE_SIMILARITY_CHUNK, 0]],
                                scores[edges[start:start + PERFORMANCE_SIMILARITY_CHUNK, 1]])
            for start in range(0, len(edges), PERFORMANCE_SIMILARITY_CHUNK)
        ])
        weights = (1 - mix) * weights + mix * performance
    graph = igraph.Graph(n=rows)
    graph.add_edges(edges)
    graph.es["weight"] = np.clip(weights, 0.0, None)
    return graph


def _by_decreasing_size(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..T-1 by decreasing community size (ties: lower old label first)."""
    _, labels = np.unique(labels, return_inverse=True)
    sizes = np.bincount(labels)
    new_label = np.empty(len(sizes), dtype=np.int64)
    new_label[np.lexsort((np.arange(len(sizes)), -sizes))] = np.arange(len(sizes))
    return new_label[labels]


def leiden(graph: igraph.Graph, resolution: float, seed: int, implementation: str = "auto") -> np.ndarray:
    """Community label per node: weighted Leiden on the modularity with a resolution (RB configuration),
    numbered by decreasing size.

    Iterates until an iteration improves nothing, so the result does not depend on an iteration budget; a
    fixed seed gives the same labels. `implementation`: "leidenalg", "igraph" (its C implementation,
    seeded through igraph's random number generator hook) or "auto" (igraph from LEIDEN_IGRAPH_FROM_NODES).
    """
    if implementation not in LEIDEN_IMPLEMENTATIONS:
        raise ValueError(f"unknown Leiden implementation {implementation!r}: use one of {LEIDEN_IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "igraph" if graph.vcount() >= LEIDEN_IGRAPH_FROM_NODES else "leidenalg"
    weights = "weight" if "weight" in graph.es.attributes() else None
    if implementation == "leidenalg":
        membership = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition, weights=weights,
                                              resolution_parameter=resolution, n_iterations=-1, seed=seed).membership
    else:
        igraph.set_random_number_generator(random.Random(seed))
        try:
            membership = graph.community_leiden(objective_function="modularity", weights=weights, resolution=resolution,
                                                n_iterations=-1).membership
        finally:
            igraph.set_random_number_generator(random)  # igraph's default: the random module
    return _by_decreasing_size(np.asarray(membership, dtype=np.int64))


def merge_small_communities(labels: np.ndarray, embeddings: np.ndarray, min_size: int) -> np.ndarray:
    """Fold every community below `min_size` into the one of at least that size with the nearest centroid.

    Centroids are mean embeddings compared by cosine. If no community reaches `min_size`, all fold into the
    largest. Labels come back renumbered 0..T-1 by decreasing size (ties: lower old label first).
    """
    _, labels = np.unique(labels, return_inverse=True)
    return merge_by_centroids(labels, community_sums(labels, embeddings, labels.max() + 1), min_size)


def community_sums(labels: np.ndarray, embeddings: np.ndarray, communities: int) -> np.ndarray:
    """[communities, D] the sum of each community's embeddings (a streamed corpus adds these up shard by shard)."""
    # Per-dimension bincount: several times faster than np.add.at on [1e6, 384].
    return np.stack([np.bincount(labels, weights=embeddings[:, dim], minlength=communities)
                     for dim in range(embeddings.shape[1])], axis=1)


def merge_by_centroids(labels: np.ndarray, sums: np.ndarray, min_size: int) -> np.ndarray:
    """`merge_small_communities` on labels 0..C-1 with each community's embedding sum [C, D]."""
    sizes = np.bincount(labels, minlength=len(sums))
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    targets = np.flatnonzero(sizes >= min_size)
    if len(targets) == 0:
        targets = np.array([np.argmax(sizes)])
    merged_into = np.arange(len(sizes))
    small = np.flatnonzero(sizes < min_size)
    small = small[~np.isin(small, targets)]
    for start in range(0, len(small), MERGE_CHUNK):  # bounds the [small, targets] similarity matrix
        chunk = small[start:start + MERGE_CHUNK]
        merged_into[chunk] = targets[np.argmax(centroids[chunk] @ centroids[targets].T, axis=1)]
    return _by_decreasing_size(merged_into[labels])


def discover_tasks(embeddings: np.ndarray, scores: np.ndarray | None, *, k: int = 10, mix: float = 0.5,
                   resolution: float = 1.0, min_size: int = 20, seed: int = 0, use_ray: bool = False
                   ) -> np.ndarray:
    """Latent task label per prompt: kNN graph -> mixed edge weights -> Leiden -> tiny tasks merged."""
    neighbours, similarities = knn(embeddings, k, use_ray=use_ray, seed=seed)
    graph = task_graph(neighbours, similarities, scores, mix)
    return merge_small_communities(leiden(graph, resolution, seed), embeddings, min_size)
