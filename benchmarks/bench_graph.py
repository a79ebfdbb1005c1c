"""Scale benchmark of Stage 1's graph part: kNN graph, edge weights, Leiden, at 1e5..1e6 prompts.

Synthetic data shaped like sentence embeddings (see `clustered_embeddings`): Gaussian clusters of prompts
in low-dimensional domain subspaces plus isotropic noise, L2-normalised (pure isotropic Gaussians in 384-d
would make every neighbour search hopeless, well separated clusters would make it trivial); 0/1 scores of
a model pool whose solve rates depend on the cluster. Each (size, index) runs in a fresh process so that
its peak RSS is its own. From the repository root:

    python -m benchmarks.bench_graph --sizes 100000 1000000 [--indexes auto hnsw ivf] [--leiden leidenalg igraph]
    python -m benchmarks.bench_graph --sizes 200000 --indexes hnsw --hnsw 32,64,32 32,40,24   # HNSW settings compared

With several `--leiden` implementations, each runs on the same graph; the table gives each one's time and
the modularity (at the resolution) of what it found, so speed is compared at equal quality.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import faiss
import numpy as np

from training import graph as graph_module
from training.graph import (
    LEIDEN_IMPLEMENTATIONS,
    knn,
    leiden,
    resolve_index_kind,
    task_graph,
)

DOMAINS = 20
DOMAIN_RANK = 24  # dimension of each domain's subspace, near the local intrinsic dimension of MiniLM prompts
CLUSTER_SPREAD = 0.3  # spread of cluster centres within a domain, relative to a prompt's spread around its centre
SUBSPACE_NORM = 1.6  # norm of a prompt's in-domain offset from the domain centre (unit norm), before normalising
NOISE_NORM = 1.2  # isotropic noise over all dimensions
MODELS = 11


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def clustered_embeddings(rows: int, clusters: int, dim: int, seed: int, row_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 rows from `clusters` Gaussian clusters inside DOMAINS subspaces, and their clusters.

    Calibrated at 6k rows against all-MiniLM-L6-v2 embeddings of the llmrouter prompts (10th neighbour's cosine,
    local intrinsic dimension, IVF recall at a few nprobe; the figures are in docs/scaling.md).
    Clusters of one domain overlap, as benchmarks' prompt styles do; Leiden need not recover them one to one.
    `row_seed` draws the rows with their own seed from the structure `seed` fixes (a corpus written in shards).
    """
    rng = np.random.default_rng(seed)
    domain_centres = _unit_rows(rng.standard_normal((DOMAINS, dim), dtype=np.float32))
    domain_bases = rng.standard_normal((DOMAINS, DOMAIN_RANK, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    domain_of_cluster = rng.integers(DOMAINS, size=clusters)
    cluster_centres = rng.standard_normal((clusters, DOMAIN_RANK), dtype=np.float32) * np.float32(CLUSTER_SPREAD)
    rng = rng if row_seed is None else np.random.default_rng(row_seed)
    cluster_of_row = rng.integers(clusters, size=rows)
    domain_of_row = domain_of_cluster[cluster_of_row]
    embeddings = rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(NOISE_NORM / np.sqrt(dim))
    offset_scale = np.float32(SUBSPACE_NORM / np.sqrt(DOMAIN_RANK * (1 + CLUSTER_SPREAD**2)))
    by_domain = np.argsort(domain_of_row, kind="stable")
    starts = np.searchsorted(domain_of_row[by_domain], np.arange(DOMAINS + 1))
    for domain in range(DOMAINS):
        members = by_domain[starts[domain]:starts[domain + 1]]
        latent = cluster_centres[cluster_of_row[members]] + rng.standard_normal(
            (len(members), DOMAIN_RANK), dtype=np.float32)
        embeddings[members] += domain_centres[domain] + latent @ domain_bases[domain] * offset_scale
    return _unit_rows(embeddings), cluster_of_row


def cluster_dependent_scores(cluster_of_row: np.ndarray, clusters: int, seed: int, row_seed: int | None = None) -> np.ndarray:
    """0/1 scores [rows, MODELS]: each model solves each cluster's prompts at its own rate (`row_seed` as in
    `clustered_embeddings`)."""
    rng = np.random.default_rng(seed + 1)
    solve_rate = rng.beta(0.7, 0.7, size=(clusters, MODELS))
    rng = rng if row_seed is None else np.random.default_rng(row_seed + 1)
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


def run_one(rows: int, index: str, hnsw: tuple[int, int, int] | None, args: argparse.Namespace) -> dict:
    """One size and index in this (fresh) process; `hnsw` (links per node, efConstruction, efSearch) replaces the
    product's HNSW settings here, so that settings can be compared on the same data."""
    if hnsw is not None:
        graph_module.HNSW_LINKS_PER_NODE, graph_module.HNSW_EF_CONSTRUCTION, graph_module.HNSW_EF_SEARCH = hnsw
    embeddings, cluster_of_row = clustered_embeddings(rows, args.clusters, args.dim, args.seed)
    scores = cluster_dependent_scores(cluster_of_row, args.clusters, args.seed)
    (neighbours, similarities), knn_wall, knn_cpu = timed(knn, embeddings, args.k, index=index, seed=args.seed)
    recall = recall_at_k(embeddings, neighbours, args.k, args.recall_queries, args.seed)
    graph, graph_wall, _ = timed(task_graph, neighbours, similarities, scores, args.mix)
    del neighbours, similarities
    communities = []
    for implementation in args.leiden:
        labels, leiden_wall, leiden_cpu = timed(leiden, graph, args.resolution, args.seed, implementation)
        modularity = graph.modularity(labels.tolist(), weights="weight", resolution=args.resolution)
        communities.append({"leiden": implementation, "leiden_wall": leiden_wall, "leiden_cpu": leiden_cpu,
                            "communities": int(labels.max()) + 1, "modularity": modularity})
    kind = resolve_index_kind(index, rows)
    if kind == "hnsw":
        kind += f" M{graph_module.HNSW_LINKS_PER_NODE} efC{graph_module.HNSW_EF_CONSTRUCTION} efS{graph_module.HNSW_EF_SEARCH}"
    return {"rows": rows, "index": kind, "knn_wall": knn_wall, "knn_cpu": knn_cpu,
            "recall": recall, "edges": graph.ecount(), "graph_wall": graph_wall, "leiden": communities,
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
    parser.add_argument("--leiden", nargs="+", default=["auto"], choices=LEIDEN_IMPLEMENTATIONS)
    parser.add_argument("--hnsw", nargs="+", metavar="M,EFC,EFS",
                        help="HNSW settings to compare (links per node, efConstruction, efSearch); default: the product's")
    args = parser.parse_args()
    hnsw_settings = [tuple(int(part) for part in setting.split(",")) for setting in args.hnsw] if args.hnsw else [None]

    print(f"{faiss.omp_get_max_threads()} faiss threads; k={args.k}, dim={args.dim}, clusters={args.clusters}, "
          f"mix={args.mix}, resolution={args.resolution}")
    print("| prompts | index | kNN build+query s (CPU s) | recall@k | edges | graph s | Leiden | Leiden s (CPU s) "
          "| communities | modularity | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    spawn = multiprocessing.get_context("spawn")
    for rows in args.sizes:
        for index, hnsw in [(index, hnsw) for index in args.indexes for hnsw in (hnsw_settings if index == "hnsw" else [None])]:
            with spawn.Pool(1) as pool:  # a fresh process per run: ru_maxrss is a lifetime maximum
                result = pool.apply(run_one, (rows, index, hnsw, args))
            for found in result["leiden"]:
                print(f"| {result['rows']:,} | {result['index']} | {result['knn_wall']:.1f} ({result['knn_cpu']:.0f}) "
                      f"| {result['recall']:.3f} | {result['edges']:,} | {result['graph_wall']:.1f} | {found['leiden']} "
                      f"| {found['leiden_wall']:.1f} ({found['leiden_cpu']:.0f}) | {found['communities']:,} "
                      f"| {found['modularity']:.4f} | {result['peak_rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
