"""Scale benchmark of the streamed fit (`training.streaming`): time per step and peak memory at 1e5..1e6 prompts,
and the encoder's throughput on 1, 2 and 3 simulated nodes.

The corpus is synthetic and written straight into shards by Ray tasks (the encoder is measured apart, on real
prompts: encoding 1e6 prompts on 2 cores would take hours): embeddings shaped like MiniLM's
(`benchmarks.bench_graph.clustered_embeddings`, one structure shared by every shard), 0/1 scores of 11 models
that depend on the cluster, short prompts of random length. Each size runs in a fresh process, so the driver's
peak RSS is its own; a sampler thread records the largest RSS of any Ray worker process meanwhile.

    python -m benchmarks.bench_scale --sizes 100000 300000 1000000 --out DIR   # steps 2-6 per size
    python -m benchmarks.bench_scale --nodes 1 2 3 --out DIR  # the encoder's throughput per node
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ADDRESS", "local")

import numpy as np
import pyarrow as pa

from benchmarks.bench_graph import (
    MODELS,
    cluster_dependent_scores,
    clustered_embeddings,
)

CLUSTERS = 200
WORDS = ("explain", "solve", "write", "prove", "list", "compare", "the", "function", "equation", "essay", "code", "why")


def _write_synthetic_shard(folder: str, shard: int, rows: int, seed: int, validation_below: float) -> tuple[str, int]:
    """One shard of the synthetic corpus (its rows drawn with their own seed from the shared cluster structure)."""
    from training.corpus import fixed_lists, write_table

    row_seed = seed * 100_003 + shard + 1
    embeddings, clusters = clustered_embeddings(rows, CLUSTERS, 384, seed, row_seed=row_seed)
    scores = cluster_dependent_scores(clusters, CLUSTERS, seed, row_seed=row_seed)  # every shard: the same solve rates
    rng = np.random.default_rng(row_seed + 2)
    tokens = rng.integers(8, 400, rows)
    prices = np.geomspace(0.05, 10.0, MODELS) / 1e6
    prompts = [" ".join(rng.choice(WORDS, size=int(t // 8 + 1))) for t in tokens]
    slot = rng.random(rows)
    name = f"part-{shard * rows:012d}-{(shard + 1) * rows:012d}.parquet"
    write_table(f"{folder}/{name}", pa.table({
        "row": pa.array(np.arange(shard * rows, (shard + 1) * rows), pa.int64()),
        "prompt": pa.array(prompts, pa.string()),
        "benchmark": pa.array([f"cluster{c % 20}" for c in clusters], pa.string()),
        "scores": fixed_lists(scores),
        "costs": fixed_lists((tokens[:, None] + 200) * prices[None, :]),
        "prompt_tokens": pa.array(tokens, pa.int64()),
        "embedding": fixed_lists(embeddings),
        "slot": pa.array(slot, pa.float64()),
    }))
    return name, int((slot >= validation_below).sum())


def synthetic_corpus(folder: str, rows: int, seed: int = 0):
    """A `Corpus` of `rows` synthetic training rows in shards of ROWS_PER_SHARD, written by Ray tasks."""
    import ray

    from training.corpus import ROWS_PER_SHARD, SAMPLE_ROWS, VALIDATION_ROWS, Corpus

    validation_below = min(0.2, VALIDATION_ROWS / rows)
    write = ray.remote(num_cpus=1)(_write_synthetic_shard)
    shards = ray.get([write.remote(folder, shard, ROWS_PER_SHARD, seed, validation_below) for shard in range(rows // ROWS_PER_SHARD)])
    corpus = Corpus(folder=folder, name=f"synthetic-{rows}", models=[f"model{m}" for m in range(MODELS)], embedder="synthetic",
                    shards=[name for name, _ in shards], shard_rows=[count for _, count in shards],
                    validation_below=validation_below, sample_below=validation_below + min(1.0, SAMPLE_ROWS / rows))
    corpus.save()
    return corpus


class WorkerMemory(threading.Thread):
    """Samples the RSS of every Ray worker process (`ray::...`) and keeps the largest seen."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.peak, self.peak_name, self.done = interval, 0, "", threading.Event()

    def run(self):
        import psutil

        while not self.done.is_set():
            for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
                command = " ".join(process.info["cmdline"] or [])
                if command.startswith("ray::") and process.info["memory_info"] is not None:
                    if process.info["memory_info"].rss > self.peak:
                        self.peak, self.peak_name = process.info["memory_info"].rss, command.split(" ")[0]
            time.sleep(self.interval)

    def stop(self) -> tuple[float, str]:
        self.done.set()
        self.join()
        return self.peak / 2**30, self.peak_name


def _one_size(rows: int, epochs: int, seed: int, queue) -> None:
    """Steps 2-6 of the streamed fit on a synthetic corpus of `rows`, in this (fresh) process."""
    import ray

    from training.fit import FitConfig
    from training.moe import NetworkConfig
    from training.streaming import fit_corpus

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        started = time.perf_counter()
        corpus = synthetic_corpus(folder, rows, seed)
        generated = time.perf_counter() - started
        driver_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        watcher = WorkerMemory()
        watcher.start()
        config = FitConfig(seed=seed, network=NetworkConfig(epochs=epochs, task_epochs=max(1, epochs // 2)))
        artifact = fit_corpus(corpus, config, log=lambda message: print(f"  [{rows}] {message}", flush=True))
        worker_peak, worker_name = watcher.stop()
    streamed = artifact.manifest["validation"]["streamed"]
    queue.put({"rows": rows, "generate_s": generated, "seconds": streamed["seconds"], "knn_seconds": streamed["knn_seconds"],
               "tasks": artifact.manifest["tasks"], "stage1": {k: artifact.manifest["validation"]["stage1"][k] for k in ("k", "mix", "resolution")},
               "driver_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "driver_peak_before_fit_gib": driver_before, "load_average_15m": os.getloadavg()[2], "worker_peak_gib": worker_peak, "worker_peak_process": worker_name})
    ray.shutdown()


def _node_throughput(nodes: int, prompts: int, queue) -> None:
    """On a `Cluster` of `nodes` one-CPU raylets: the encoder's throughput (the step that spreads over nodes; the
    kNN graph and Leiden are one task each, on one node)."""
    import ray
    from ray.cluster_utils import Cluster

    from serve.core.encoder import DEFAULT_EMBEDDER
    from training.corpus import embed_corpus
    from training.datasets import load_dataset

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as folder:
        table = load_dataset("llmrouter_9model")
        records = [{"prompt": table.prompts[i], "scores": dict(zip(table.models, table.scores[i].tolist()))} for i in range(prompts)]
        os.makedirs(f"{folder}/input")
        with open(f"{folder}/input/prompts.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        started = time.perf_counter()
        embed_corpus(f"{folder}/input", DEFAULT_EMBEDDER, workspace=f"{folder}/embedded", num_actors=nodes,
                     rows_per_shard=max(50, prompts // (4 * nodes)), log=lambda message: None)
        embed_seconds = time.perf_counter() - started
    queue.put({"nodes": nodes, "embed_prompts_per_s": prompts / embed_seconds, "embed_s": embed_seconds})
    ray.shutdown()
    cluster.shutdown()


def _step_seconds(size: dict) -> dict[str, float]:
    """A size's seconds per step, with the kNN step's parts apart."""
    return {**size["seconds"], **size["knn_seconds"]}


def growth_exponents(sizes: list[dict]) -> dict[str, float]:
    """Per step, b in seconds ~ rows^b between the smallest and the largest size (1 is linear)."""
    first, last = _step_seconds(sizes[0]), _step_seconds(sizes[-1])
    ratio = np.log(sizes[-1]["rows"] / sizes[0]["rows"])
    return {step: float(np.log(last[step] / first[step]) / ratio) for step in first}


def write_report(results: dict, folder: str) -> None:
    """report.json, report.md and scaling.png (seconds per step against rows, log-log) in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    sizes = results["sizes"]
    lines = [f"`{results['command']}`" + (f" (commit {results['commit']})" if "commit" in results else "")
             + f", {results['cpus']} CPUs. {results.get('notes', '')}".rstrip(), ""] if "command" in results else []
    if sizes:
        steps = list(sizes[0]["seconds"])
        knn_parts = list(sizes[0]["knn_seconds"])
        lines += ["| rows | " + " | ".join(f"{step} s" for step in steps) + "".join(f" | of kNN: {part} s" for part in knn_parts)
                  + " | total s | graph stage (kNN + tasks) s | tasks | driver peak GiB | largest worker GiB |",
                  "|---" * (len(steps) + len(knn_parts) + 6) + "|"]
        for size in sizes:
            seconds = size["seconds"]
            lines.append(f"| {size['rows']:,} | " + " | ".join(f"{seconds[step]:.0f}" for step in steps)
                         + "".join(f" | {size['knn_seconds'][part]:.0f}" for part in knn_parts) + f" | {sum(seconds.values()):.0f} "
                         f"| {seconds['knn'] + seconds['tasks']:.0f} | {size['tasks']} | {size['driver_peak_gib']:.2f} "
                         f"| {size['worker_peak_gib']:.2f} ({size['worker_peak_process']}) |")
        if len(sizes) > 1:
            results["growth_exponents"] = growth_exponents(sizes)
            lines += ["", "Growth, seconds ~ rows^b from the smallest to the largest size: "
                      + ", ".join(f"{step} {b:.2f}" for step, b in results["growth_exponents"].items())]
        figure, axes = plt.subplots(figsize=(6, 4))
        rows = [size["rows"] for size in sizes]
        for step in _step_seconds(sizes[0]):
            axes.plot(rows, [_step_seconds(size)[step] for size in sizes], marker="o", label=step)
        axes.set(xscale="log", yscale="log", xlabel="training rows", ylabel="seconds", title="Streamed fit, steps 2-6 on 2 cores")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(f"{folder}/scaling.png", dpi=120)
    if results["nodes"]:
        lines += ["", "| simulated nodes (1 CPU each) | encoder prompts/s |", "|---|---|"]
        lines += [f"| {node['nodes']} | {node['embed_prompts_per_s']:.1f} |" for node in results["nodes"]]
    with open(f"{folder}/report.json", "w") as handle:
        json.dump(results, handle, indent=1)
    with open(f"{folder}/report.md", "w") as handle:
        handle.write("\n".join(lines) + "\n")


def _in_fresh_process(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="corpus sizes for steps 2-6 (multiples of 20,000)")
    parser.add_argument("--epochs", type=int, default=4, help="Stage 2 epochs (phase 1; phase 2 gets half)")
    parser.add_argument("--nodes", type=int, nargs="*", default=[], help="simulated node counts for the throughput runs")
    parser.add_argument("--node-prompts", type=int, default=1_000, help="real prompts in each throughput run's encoder step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="a folder for report.json, report.md and scaling.png")
    parser.add_argument("--report-from", help="only write the report of an earlier run's report.json (into --out)")
    args = parser.parse_args()

    # The module's own functions, not __main__'s: Ray's workers import them by module name.
    from benchmarks import bench_scale

    if args.report_from:
        with open(args.report_from) as handle:
            write_report(json.load(handle), args.out)
        return
    results = {"sizes": [], "nodes": [], "command": " ".join(["python -m benchmarks.bench_scale", *sys.argv[1:]]),
               "cpus": os.cpu_count()}
    for rows in args.sizes:
        result = _in_fresh_process(bench_scale._one_size, rows, args.epochs, args.seed)
        results["sizes"].append(result)
        steps = " ".join(f"{k} {v:.1f}s" for k, v in result["seconds"].items())
        print(f"{rows:>9,} rows: {steps}; total {sum(result['seconds'].values()):.1f}s; {result['tasks']} tasks; "
              f"driver peak {result['driver_peak_gib']:.2f} GiB; largest worker {result['worker_peak_gib']:.2f} GiB "
              f"({result['worker_peak_process']}); machine load {result['load_average_15m']:.1f} on {os.cpu_count()} CPUs", flush=True)
    for nodes in args.nodes:
        result = _in_fresh_process(bench_scale._node_throughput, nodes, args.node_prompts)
        results["nodes"].append(result)
        print(f"{nodes} node(s): encoder {result['embed_prompts_per_s']:.1f} prompts/s", flush=True)
    if args.out:
        write_report(results, args.out)


if __name__ == "__main__":
    main()
