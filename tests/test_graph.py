"""Stage 1 graph part: the kNN graph builders, performance similarity, task graph, Leiden, merging of tiny tasks."""

from __future__ import annotations

import numpy as np
import pytest

from training import neighbours as neighbours_module
from training.exact_knn import torch_knn
from training.graph import (
    discover_tasks,
    leiden,
    merge_small_communities,
    rank_biased_overlap,
    task_graph,
)
from training.neighbours import EXACT_BELOW_ROWS, knn, resolve_method

APPROXIMATE = ["ivf", "nndescent", "hnsw"]


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def _planted_clusters(clusters: int = 5, per_cluster: int = 100, dim: int = 384, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters in `dim` dimensions, L2-normalised, and each row's cluster."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(clusters), per_cluster)
    centres = rng.standard_normal((clusters, dim))
    return _unit_rows(centres[truth] + 0.6 * rng.standard_normal((len(truth), dim))), truth


def _brute_force_knn(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    similarities = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
    np.fill_diagonal(similarities, -np.inf)
    neighbours = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return neighbours, np.take_along_axis(similarities, neighbours, axis=1)


def _fraction_matching(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of rows in their community's majority cluster; 0 unless communities and clusters pair one to one."""
    contingency = np.zeros((found.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(contingency, (found, truth), 1)
    one_to_one = (contingency.shape[0] == contingency.shape[1]
                  and len(np.unique(contingency.argmax(axis=1))) == len(contingency))
    return contingency.max(axis=1).sum() / len(truth) if one_to_one else 0.0


def _recall(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(row, true)) / expected.shape[1] for row, true in zip(found, expected)]))


def test_exact_knn_matches_brute_force():
    embeddings = _unit_rows(np.random.default_rng(1).standard_normal((400, 32)))
    neighbours, similarities = knn(embeddings, 7, method="exact", block_size=150)
    expected_neighbours, expected_similarities = _brute_force_knn(embeddings, 7)
    assert neighbours.dtype == np.int64 and similarities.dtype == np.float32
    np.testing.assert_array_equal(neighbours, expected_neighbours)
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)


@pytest.mark.parametrize("method", APPROXIMATE)
def test_approximate_knn_finds_most_true_neighbours_best_first(method):
    embeddings, _ = _planted_clusters(clusters=20, per_cluster=100, dim=64)
    neighbours, similarities = knn(embeddings, 10, method=method)
    expected, _ = _brute_force_knn(embeddings, 10)
    assert _recall(neighbours, expected) >= 0.9
    assert not (neighbours == np.arange(len(embeddings))[:, None]).any()
    assert (np.diff(similarities, axis=1) <= 0).all()
    found = np.einsum("rd,rkd->rk", embeddings, embeddings[neighbours])  # each similarity is its pair's cosine
    np.testing.assert_allclose(similarities, found, atol=1e-5)


def test_ivf_self_join_searches_the_probed_lists_exactly_and_repeats_with_its_seed():
    """With as many probes as lists every row meets every other: the join is then an exact search."""
    embeddings, _ = _planted_clusters(clusters=8, per_cluster=60, dim=32)
    lists = neighbours_module.ivf_lists(len(embeddings))
    probes = neighbours_module.IVF_PROBES
    try:
        neighbours_module.IVF_PROBES = lists
        neighbours, similarities = knn(embeddings, 10, method="ivf", seed=3)
    finally:
        neighbours_module.IVF_PROBES = probes
    expected_neighbours, expected_similarities = _brute_force_knn(embeddings, 10)
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)
    assert _recall(neighbours, expected_neighbours) == 1.0
    first = knn(embeddings, 10, method="ivf", seed=5)
    np.testing.assert_array_equal(knn(embeddings, 10, method="ivf", seed=5)[0], first[0])


@pytest.mark.parametrize("method", ["exact", *APPROXIMATE])
def test_knn_excludes_self_among_exact_duplicates(method):
    embeddings = _unit_rows(np.ones((6, 8)))
    neighbours, similarities = knn(embeddings, 3, method=method)
    assert not (neighbours == np.arange(6)[:, None]).any() and (neighbours >= 0).all()
    np.testing.assert_allclose(similarities, 1.0, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", *APPROXIMATE])
def test_duplicated_rows_find_their_copies_and_never_themselves(method):
    embeddings, _ = _planted_clusters(clusters=5, per_cluster=60, dim=32)
    embeddings[:40] = embeddings[0]  # 40 copies of one row: each one's 10 nearest others are copies
    neighbours, similarities = knn(embeddings, 10, method=method)
    assert not (neighbours == np.arange(len(embeddings))[:, None]).any()
    assert (neighbours[:40] < 40).mean() >= 0.9 and np.allclose(similarities[:40][neighbours[:40] < 40], 1.0, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", *APPROXIMATE])
def test_knn_of_every_other_row_when_k_is_one_less_than_the_rows(method):
    embeddings = _unit_rows(np.random.default_rng(4).standard_normal((12, 16)))
    neighbours, _ = knn(embeddings, 11, method=method)
    for row, found in enumerate(neighbours):
        assert sorted(found) == [other for other in range(12) if other != row]


def test_knn_rejects_bad_arguments():
    embeddings = _unit_rows(np.eye(4))
    with pytest.raises(ValueError, match="k must be in"):
        knn(embeddings, 4)  # fewer rows than k + 1
    with pytest.raises(ValueError, match="unknown kNN method"):
        knn(embeddings, 2, method="annoy")


@pytest.mark.skipif(neighbours_module._gpu_available() or neighbours_module._torch_gpu_available(), reason="CPU choice")
def test_auto_method_is_exact_on_small_inputs_and_the_self_join_above():
    assert resolve_method("auto", EXACT_BELOW_ROWS - 1) == "exact"
    assert resolve_method("auto", EXACT_BELOW_ROWS) == "ivf"


@pytest.mark.slow
def test_knn_in_a_ray_task_equals_plain_knn(ray_session):
    embeddings, _ = _planted_clusters(clusters=5, per_cluster=200, dim=48)
    for method in ("exact", "ivf"):
        plain = knn(embeddings, 10, method=method, block_size=300)
        on_ray = knn(embeddings, 10, method=method, block_size=300, use_ray=True)
        np.testing.assert_array_equal(on_ray[0], plain[0])
        np.testing.assert_array_equal(on_ray[1], plain[1])


def test_rank_biased_overlap_identical_scores_give_one():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], float)
    np.testing.assert_allclose(rank_biased_overlap(scores, scores), 1.0)
    # Same ranking, other score levels; and two rows favouring no model.
    np.testing.assert_allclose(rank_biased_overlap(np.array([[4, 3, 2, 1], [1, 1, 1, 1.0]]),
                                                   np.array([[0.9, 0.5, 0.2, 0.1], [0, 0, 0, 0.0]])), 1.0)


def test_rank_biased_overlap_is_symmetric_top_weighted_and_in_unit_interval():
    rng = np.random.default_rng(2)
    scores_a = (rng.random((300, 11)) < 0.5).astype(float)
    scores_b = rng.random((300, 11))
    forward = rank_biased_overlap(scores_a, scores_b)
    np.testing.assert_allclose(forward, rank_biased_overlap(scores_b, scores_a))
    assert forward.min() >= 0.0 and forward.max() <= 1.0
    ranking = np.arange(11, 0, -1, dtype=float)[None, :]
    reversed_ranking = ranking[:, ::-1]
    top_swapped = ranking[:, [1, 0, *range(2, 11)]]
    bottom_swapped = ranking[:, [*range(9), 10, 9]]
    reversed_similarity, top_swap_similarity, bottom_swap_similarity = (
        rank_biased_overlap(ranking, other)[0] for other in (reversed_ranking, top_swapped, bottom_swapped))
    assert reversed_similarity < top_swap_similarity < bottom_swap_similarity < 1.0


def test_rank_biased_overlap_of_tied_row_against_strict_ranking_is_its_expected_overlap():
    tied, strict = np.zeros((1, 2)), np.array([[1.0, 0.0]])
    # Depth 1: a random tie break puts the strict winner on top half of the time; depth 2 holds both.
    p = 0.9
    expected = (1 - p) * 0.5 + (1 - p) * p * 1.0 + p**2
    np.testing.assert_allclose(rank_biased_overlap(tied, strict, p), expected)


def test_task_graph_merges_reciprocal_edges_and_mixes_weights():
    neighbours = np.array([[1, 2], [0, 2], [0, 1]])
    similarities = np.array([[0.8, -0.2], [0.8, 0.5], [-0.2, 0.5]], dtype=np.float32)
    scores = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0]], float)
    semantic = task_graph(neighbours, similarities, scores, mix=0.0)
    assert semantic.ecount() == 3 and not semantic.is_directed()
    weight = {tuple(sorted(edge.tuple)): edge["weight"] for edge in semantic.es}
    np.testing.assert_allclose([weight[(0, 1)], weight[(0, 2)], weight[(1, 2)]], [0.8, 0.0, 0.5], atol=1e-6)
    assert task_graph(neighbours, similarities, None, mix=0.7).es["weight"] == semantic.es["weight"]
    performance = task_graph(neighbours, similarities, scores, mix=1.0)
    weight = {tuple(sorted(edge.tuple)): edge["weight"] for edge in performance.es}
    assert weight[(0, 1)] == pytest.approx(1.0) and weight[(0, 2)] < 1.0


def test_task_graph_drops_missing_neighbours():
    graph = task_graph(np.array([[1, -1], [0, -1]]), np.array([[0.9, 0.0], [0.9, 0.0]], np.float32), None, 0.0)
    assert graph.vcount() == 2 and graph.ecount() == 1


@pytest.mark.parametrize("implementation", ["leidenalg", "igraph"])
def test_leiden_recovers_planted_clusters_reproducibly(implementation):
    embeddings, truth = _planted_clusters()
    neighbours, similarities = knn(embeddings, 10)
    graph = task_graph(neighbours, similarities, None, 0.0)
    labels = leiden(graph, resolution=1.0, seed=0, implementation=implementation)
    assert _fraction_matching(labels, truth) >= 0.95
    assert (np.diff(np.bincount(labels)) <= 0).all()  # numbered by decreasing size
    np.testing.assert_array_equal(leiden(graph, resolution=1.0, seed=0, implementation=implementation), labels)


def test_torch_knn_matches_exact_faiss():
    embeddings = _unit_rows(np.random.default_rng(2).standard_normal((500, 32)))
    expected_neighbours, expected_similarities = knn(embeddings, 8, method="exact")
    neighbours, similarities = torch_knn(embeddings, 8, device="cpu", block_size=130)
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)
    np.testing.assert_array_equal(neighbours, expected_neighbours)  # random data: no ties
    np.testing.assert_array_equal(knn(embeddings, 8, method="torch", block_size=130)[0], neighbours)


def test_discover_tasks_recovers_planted_clusters_with_performance_mix_and_is_deterministic():
    embeddings, truth = _planted_clusters()
    scores = (np.random.default_rng(3).random((len(truth), 11)) < 0.5).astype(float)
    labels = discover_tasks(embeddings, scores, k=10, mix=0.5, min_size=20, seed=7)
    assert _fraction_matching(labels, truth) >= 0.95
    np.testing.assert_array_equal(labels, discover_tasks(embeddings, scores, k=10, mix=0.5, min_size=20, seed=7))


def test_merge_small_communities_folds_tiny_ones_into_the_nearest_and_renumbers_by_size():
    embeddings, truth = _planted_clusters(clusters=3, per_cluster=40, dim=16)
    labels = truth.copy()
    labels[:3] = 7  # three rows of cluster 0 split off as a tiny community
    labels[40:41] = 9  # one row of cluster 1 alone
    labels[80:] = np.where(np.arange(40) < 30, 2, 5)  # cluster 2 split 30 / 10
    merged = merge_small_communities(labels, embeddings, min_size=20)
    np.testing.assert_array_equal(np.bincount(merged), [40, 40, 40])
    assert _fraction_matching(merged, truth) == 1.0
    sizes = np.bincount(merge_small_communities(np.repeat([4, 1, 3], [5, 25, 30]), embeddings[:60], 20))
    assert len(sizes) == 2 and sizes.min() >= 20 and sizes[0] >= sizes[1]


def test_merge_small_communities_with_none_large_enough_makes_one_task():
    embeddings, truth = _planted_clusters(clusters=4, per_cluster=5, dim=8)
    np.testing.assert_array_equal(merge_small_communities(truth, embeddings, min_size=20), 0)
