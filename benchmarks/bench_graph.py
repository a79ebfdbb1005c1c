"""The kNN graph builders side by side: time, recall@10 against exact search, and the Leiden modularity of the
graph each one gives, on synthetic data at 1e4..1e6 prompts and on real MiniLM embeddings of the four datasets.

Synthetic data shaped like sentence embeddings (see `clustered_embeddings`): Gaussian clusters of prompts
in low-dimensional domain subspaces plus isotropic noise, L2-normalised (pure isotropic Gaussians in 384-d
would make every neighbour search hopeless, well separated clusters would make it trivial); 0/1 scores of
a model pool whose solve rates depend on the cluster. The real set is every prompt of the four datasets, embedded
by the project's encoder (from the embeddings cache, `python -m training embed --dataset NAME`), with no scores
(a purely semantic graph). Each (data, method) runs in a fresh process so that its peak RSS is its own.

Every run merges its rows into DIR/report.json (a row per data, size and method, with its command and commit)
and rewrites DIR/report.md from all of them, so that heavy sizes can run one method per command:

    python -m benchmarks.bench_graph --sizes 100000 --methods exact ivf nndescent hnsw --real --out docs/results/graph
    python -m benchmarks.bench_graph --sizes 1000000 --methods ivf --out docs/results/graph
    python -m benchmarks.bench_graph --sizes 100000 --methods ivf --leiden leidenalg igraph   # Leiden compared

Recall@10 is measured on `--recall-queries` rows against an exact search over all rows. Modularity is that of
Leiden's partition (at the resolution) on each method's own graph; the table compares it with the reference
method of the same data and size (exact where it ran, else HNSW, the method before the self-join).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from training import neighbours as neighbours_module
from training.graph import LEIDEN_IMPLEMENTATIONS, leiden, task_graph
from training.neighbours import METHODS, knn, resolve_method

REAL_DATASETS = ("llmrouter_9model", "routerbench_partial", "routerdc_7model", "alpacaeval2_58model")

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


def real_embeddings() -> np.ndarray:
    """Every prompt of the four datasets, embedded by the project's encoder (cached after the first time)."""
    from training.datasets import load_dataset
    from training.embed import embed_texts

    return np.concatenate([embed_texts(load_dataset(name).prompts, use_ray=False) for name in REAL_DATASETS])


def run_one(data: str, rows: int, method: str, hnsw: tuple[int, int, int] | None, args: argparse.Namespace) -> dict:
    """One data set and method in this (fresh) process; `hnsw` (links per node, efConstruction, efSearch) replaces
    the product's HNSW settings here, so that settings can be compared on the same data."""
    if hnsw is not None:
        neighbours_module.HNSW_LINKS_PER_NODE, neighbours_module.HNSW_EF_CONSTRUCTION, neighbours_module.HNSW_EF_SEARCH = hnsw
    if data == "real":
        embeddings, scores = real_embeddings(), None
    else:
        embeddings, cluster_of_row = clustered_embeddings(rows, args.clusters, args.dim, args.seed)
        scores = cluster_dependent_scores(cluster_of_row, args.clusters, args.seed)
    (neighbours, similarities), knn_wall, knn_cpu = timed(knn, embeddings, args.k, method=method, seed=args.seed)
    recall = recall_at_k(embeddings, neighbours, args.k, args.recall_queries, args.seed)
    graph, graph_wall, _ = timed(task_graph, neighbours, similarities, scores, args.mix)
    del neighbours, similarities
    communities = []
    for implementation in args.leiden:
        labels, leiden_wall, leiden_cpu = timed(leiden, graph, args.resolution, args.seed, implementation)
        modularity = graph.modularity(labels.tolist(), weights="weight", resolution=args.resolution)
        communities.append({"leiden": implementation, "leiden_wall": leiden_wall, "leiden_cpu": leiden_cpu,
                            "communities": int(labels.max()) + 1, "modularity": modularity})
    chosen = resolve_method(method, len(embeddings))
    if chosen == "hnsw":
        chosen += f" M{neighbours_module.HNSW_LINKS_PER_NODE} efC{neighbours_module.HNSW_EF_CONSTRUCTION} efS{neighbours_module.HNSW_EF_SEARCH}"
    return {"data": data, "rows": len(embeddings), "method": chosen, "knn_wall": knn_wall, "knn_cpu": knn_cpu,
            "recall": recall, "recall_queries": min(args.recall_queries, len(embeddings)), "edges": graph.ecount(),
            "graph_wall": graph_wall, "leiden": communities, "faiss_threads": faiss.omp_get_max_threads(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _commit() -> str:
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return commit + ("+changes" if status.strip() else "")


def _same_data(rows: list[dict], row: dict, method: str) -> dict | None:
    """The row of `method` (a prefix: "hnsw" matches any HNSW settings) on the data and size of `row`."""
    return next((r for r in rows if (r["data"], r["rows"]) == (row["data"], row["rows"]) and r["method"].startswith(method)), None)


def markdown(rows: list[dict]) -> str:
    """report.md: one table of every row; time against HNSW (the method before the self-join) and modularity
    against exact search (else HNSW) on the same data and size."""
    lines = ["# kNN graph builders side by side", "",
             "Written by `benchmarks/bench_graph.py` (see its docstring); each row names its command and commit.", "",
             "| data | prompts | method | kNN s (CPU s) | time / HNSW's | recall@10 (queries) | edges | Leiden | communities "
             "| modularity | minus exact's (else HNSW's) | peak RSS GiB | commit | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["data"] != "real", r["rows"], r["method"])):
        hnsw = _same_data(rows, row, "hnsw")
        reference = _same_data(rows, row, "exact") or hnsw
        for found in row["leiden"]:
            versus = next((f for f in reference["leiden"] if f["leiden"] == found["leiden"]), None) if reference else None
            ratio = f"{row['knn_wall'] / hnsw['knn_wall']:.2f}" if hnsw else "-"
            delta = f"{found['modularity'] - versus['modularity']:+.4f}" if versus else "-"
            lines.append(f"| {row['data']} | {row['rows']:,} | {row['method']} | {row['knn_wall']:.1f} ({row['knn_cpu']:.0f}) "
                         f"| {ratio} | {row['recall']:.3f} ({row['recall_queries']:,}) | {row['edges']:,} | {found['leiden']} "
                         f"{found['leiden_wall']:.1f} s | {found['communities']:,} | {found['modularity']:.4f} | {delta} "
                         f"| {row['peak_rss_gib']:.2f} | {row['commit']} | `{row['command']}` |")
    return "\n".join(lines) + "\n"


def save(out: Path, new_rows: list[dict]) -> None:
    """Merge `new_rows` into out/report.json (replacing rows of the same data, size and method), rewrite report.md."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    key = lambda row: (row["data"], row["rows"], row["method"])  # noqa: E731
    replaced = {key(row) for row in new_rows}
    rows = [row for row in rows if key(row) not in replaced] + new_rows
    path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    (out / "report.md").write_text(markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000], help="synthetic sizes (none: real data only)")
    parser.add_argument("--real", action="store_true", help="also the four datasets' real MiniLM embeddings")
    parser.add_argument("--methods", nargs="+", default=["auto"], choices=METHODS)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--leiden", nargs="+", default=["auto"], choices=LEIDEN_IMPLEMENTATIONS)
    parser.add_argument("--hnsw", nargs="+", metavar="M,EFC,EFS",
                        help="HNSW settings to compare (links per node, efConstruction, efSearch); default: the product's")
    parser.add_argument("--out", type=Path, help="merge the rows into OUT/report.json and rewrite OUT/report.md")
    args = parser.parse_args()
    hnsw_settings = [tuple(int(part) for part in setting.split(",")) for setting in args.hnsw] if args.hnsw else [None]
    command = "python -m benchmarks.bench_graph " + " ".join(sys.argv[1:])
    commit = _commit()

    print(f"{faiss.omp_get_max_threads()} faiss threads; k={args.k}, dim={args.dim}, clusters={args.clusters}, "
          f"mix={args.mix}, resolution={args.resolution}; commit {commit}")
    spawn = multiprocessing.get_context("spawn")
    runs = [("real", 0)] * args.real + [("synthetic", rows) for rows in args.sizes]
    results = []
    for data, rows in runs:
        for method, hnsw in [(m, h) for m in args.methods for h in (hnsw_settings if m == "hnsw" else [None])]:
            with spawn.Pool(1) as pool:  # a fresh process per run: ru_maxrss is a lifetime maximum
                result = pool.apply(run_one, (data, rows, method, hnsw, args))
            results.append({**result, "command": command, "commit": commit})
            for found in result["leiden"]:
                print(f"{data} {result['rows']:,} {result['method']}: kNN {result['knn_wall']:.1f} s ({result['knn_cpu']:.0f} CPU s), "
                      f"recall@{args.k} {result['recall']:.3f}, {result['edges']:,} edges, {found['leiden']} "
                      f"{found['leiden_wall']:.1f} s, {found['communities']} communities, modularity {found['modularity']:.4f}, "
                      f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    if args.out:
        save(args.out, results)
        print(markdown(results))


if __name__ == "__main__":
    main()
