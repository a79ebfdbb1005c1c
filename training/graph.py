"""Stage 1 task discovery, graph part: kNN graph of prompt embeddings -> Leiden communities = latent tasks.

Edge weights mix semantic similarity (cosine of the embeddings) with performance similarity (how alike two
prompts rank the models by score), so that a task groups prompts that read alike *and* favour the same
models. The kNN graph itself comes from `training.neighbours`; the rest here is plain numpy/igraph.
"""

from __future__ import annotations

import random

import igraph
import leidenalg
import numpy as np

from training.neighbours import knn

# Pairs of prompts scored per rank_biased_overlap call, bounding its temporary arrays.
PERFORMANCE_SIMILARITY_CHUNK = 200_000
# Tiny communities matched to their nearest large one per call of merge_small_communities' loop.
MERGE_CHUNK = 4096
# Leiden: leidenalg below this many nodes, igraph's C implementation (same objective, several times faster
# on large graphs: benchmarks/bench_graph.py --leiden) from it on.
LEIDEN_IMPLEMENTATIONS = ("auto", "leidenalg", "igraph")
LEIDEN_IGRAPH_FROM_NODES = 100_000


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
