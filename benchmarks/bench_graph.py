"""Scale benchmark of Stage 1's graph part: kNN graph, edge weights, Leiden, at 1e5..1e6 prompts.

Synthetic data shaped like sentence embeddings: clusters of prompts, each spread along its own
low-dimensional subspace plus a little isotropic noise (sentence embeddings have a low local intrinsic
dimension; pure isotropic Gaussians in 384-d would make every neighbour search hopeless), L2-normalised;
0/1 scores of a model pool whose solve rates depend on the cluster. Each (size, index) runs in a fresh
process so that its peak RSS is its own.

    python benchmarks/bench_graph.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import faiss
import numpy as np

from training.graph import resolve_index_kind, knn, leiden, task_graph

DOMAINS = 50
SIBLING_SPREAD = 0.7  # offset of a cluster centre from its domain centre: sibling clusters overlap
SUBSPACE_RANK = 24
SUBSPACE_SPREAD = 0.8  # norm of a prompt's offset from its cluster centre, before normalisation
NOISE_NORM = 0.35
MODELS = 11


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def clustered_embeddings(rows: int, clusters: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 rows in `clusters` clusters grouped into DOMAINS, and each row's cluster."""
    rng = np.random.default_rng(seed)
    domains = _unit_rows(rng.standard_normal((DOMAINS, dim), dtype=np.float32))
    centres = _unit_rows(domains[rng.integers(DOMAINS, size=clusters)]
                         + SIBLING_SPREAD * _unit_rows(rng.standard_normal((clusters, dim), dtype=np.float32)))
    cluster_of_row = rng.integers(clusters, size=rows)
    embeddings = rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(NOISE_NORM / np.sqrt(dim))
    by_cluster = np.argsort(cluster_of_row, kind="stable")
    starts = np.searchsorted(cluster_of_row[by_cluster], np.arange(clusters + 1))
    for cluster in range(clusters):
        members = by_cluster[starts[cluster]:starts[cluster + 1]]
        basis = rng.standard_normal((SUBSPACE_RANK, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        latent = rng.standard_normal((len(members), SUBSPACE_RANK), dtype=np.float32)
        embeddings[members] += centres[cluster] + latent @ basis * np.float32(SUBSPACE_SPREAD / np.sqrt(SUBSPACE_RANK))
    return _unit_rows(embeddings), cluster_of_row


def cluster_dependent_scores(cluster_of_row: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """0/1 scores [rows, MODELS]: each model solves each cluster's prompts at its own rate."""
    rng = np.random.default_rng(seed + 1)
    solve_rate = rng.beta(0.7, 0.7, size=(clusters, MODELS))
    return (rng.random((len(cluster_of_row), MODELS)) < solve_rate[cluster_of_row]).astype(np.float32)


def recall_at_k(embeddings: np.ndarray, neighbours: np.ndarray, k: int, queries: int, seed: int) -> float:
    """Mean fraction of the exact k nearest other rows found, over a seeded sample of query rows."""
    sample = np.random.default_rng(seed).choice(len(embeddings), size=min(queries, len(embeddings)), replace=False)
    _, exact = faiss.knn(embeddings[sample], embeddings, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    found = [len(np.intersect1d(exact_row[exact_row != row][:k], neighbours[row]))
             for row, exact_row in zip(sample, exact)]
    return float(np.mean(found)) / k


def timed(function, *args, **kwargs) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of all threads): CPU time shows the work when cores are shared."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_one(rows: int, index: str, args: argparse.Namespace) -> dict:
    embeddings, cluster_of_row = clustered_embeddings(rows, args.clusters, args.dim, args.seed)
    scores = cluster_dependent_scores(cluster_of_row, args.clusters, args.seed)
    (neighbours, similarities), knn_wall, knn_cpu = timed(knn, embeddings, args.k, index=index, seed=args.seed)
    recall = recall_at_k(embeddings, neighbours, args.k, args.recall_queries, args.seed)
    graph, graph_wall, _ = timed(task_graph, neighbours, similarities, scores, args.mix)
    del neighbours, similarities
    labels, leiden_wall, leiden_cpu = timed(leiden, graph, args.resolution, args.seed)
    return {"rows": rows, "index": resolve_index_kind(index, rows), "knn_wall": knn_wall, "knn_cpu": knn_cpu,
            "recall": recall, "edges": graph.ecount(), "graph_wall": graph_wall, "leiden_wall": leiden_wall,
            "leiden_cpu": leiden_cpu, "communities": int(labels.max()) + 1,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--indexes", nargs="+", default=["auto"], choices=["auto", "exact", "ivf", "hnsw"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"{faiss.omp_get_max_threads()} faiss threads; k={args.k}, dim={args.dim}, clusters={args.clusters}, "
          f"mix={args.mix}, resolution={args.resolution}")
    print("| prompts | index | kNN build+query s (CPU s) | recall@k | edges | graph s | Leiden s (CPU s) "
          "| communities | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    spawn = multiprocessing.get_context("spawn")
    for rows in args.sizes:
        for index in args.indexes:
            with spawn.Pool(1) as pool:  # a fresh process per run: ru_maxrss is a lifetime maximum
                result = pool.apply(run_one, (rows, index, args))
            print(f"| {result['rows']:,} | {result['index']} | {result['knn_wall']:.1f} ({result['knn_cpu']:.0f}) "
                  f"| {result['recall']:.3f} | {result['edges']:,} | {result['graph_wall']:.1f} "
                  f"| {result['leiden_wall']:.1f} ({result['leiden_cpu']:.0f}) "
                  f"| {result['communities']:,} | {result['peak_rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
