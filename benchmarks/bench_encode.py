"""Encoder cost: each encoder's batch-1 latency, its throughput by forward mini-batch size, its size on disk
and in memory, all in one process on the same threads, as ratios against the first encoder of the run.
An encoder may be an ONNX backend of one (`all-MiniLM-L6-v2@onnx-int8`, `serve.core.onnx_encoder`). With
several `--threads`, every encoder is loaded afresh and measured at each thread count in turn (ONNX Runtime
fixes its threads when a session is made).

A call's prompts are sorted by length and each mini-batch is padded to its longest, so the mini-batch size trades
padding waste against per-call overhead (`serve.core.encoder.forward_batch_size`; on a CPU a mini-batch is also
cut where padding would cost too much, `forward_batches`, which benchmarks/bench_padding.py measures).
Encodes the same test-split prompts one at a time (the latency a routed request pays), then in calls of
`--call-size` (the Serve Embedder's batch, or a Ray Data batch) with each mini-batch size.

    python benchmarks/bench_encode.py --embedders all-MiniLM-L6-v2 all-mpnet-base-v2 --threads 2
    python benchmarks/bench_encode.py --embedders all-MiniLM-L6-v2 all-MiniLM-L6-v2@onnx all-MiniLM-L6-v2@onnx-int8 \
        --threads 1 2 --out docs/results/encoder_onnx/speed
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import psutil
import torch

from serve.core.encoder import (
    DEFAULT_EMBEDDER,
    encode,
    load_encoder,
    resolve_model_path,
    split_backend,
)
from serve.core.onnx_encoder import TORCH_BACKEND, export_file
from training.datasets import load_dataset


def prompts_per_second(encoder, texts: list[str], call_size: int, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), call_size):
        encode(encoder, texts[start:start + call_size], batch_size)
    return len(texts) / (time.perf_counter() - started)


def one_at_a_time_ms(encoder, texts: list[str]) -> np.ndarray:
    """Milliseconds to encode each prompt alone, as a routed request does."""
    times = []
    for text in texts:
        started = time.perf_counter()
        encode(encoder, [text], 1)
        times.append(1000 * (time.perf_counter() - started))
    return np.array(times)


def weights_mb(name: str) -> float:
    """The weights the encoder runs: the model's safetensors on PyTorch, the ONNX file on an ONNX backend."""
    model, backend = split_backend(name)
    if backend != TORCH_BACKEND:
        return export_file(model, backend).stat().st_size / 2**20
    folder = Path(resolve_model_path(name))
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors")) / 2**20


def loaded(name: str) -> tuple[object, dict]:
    """The encoder, warmed up, and what it takes: its weights on disk and the resident memory its load added."""
    process = psutil.Process()
    before = process.memory_info().rss
    encoder = load_encoder(name, device="cpu")
    encode(encoder, ["warm-up"] * 8, 8)
    return encoder, {"name": name, "dimension": encoder.get_embedding_dimension(), "max_tokens": encoder.max_seq_length,
                     "weights_mb": weights_mb(name), "rss_mb": (process.memory_info().rss - before) / 2**20}


def measure_round(encoder, texts: list[str], call_size: int, batch_sizes: list[int]) -> dict:
    latency = one_at_a_time_ms(encoder, texts)
    return {"batch1_mean_ms": float(latency.mean()), "batch1_p50_ms": float(np.median(latency)),
            "batch1_p95_ms": float(np.percentile(latency, 95)),
            "rates": {size: prompts_per_second(encoder, texts, call_size, min(size, call_size)) for size in batch_sizes}}


def measure(names: list[str], texts: list[str], call_size: int, batch_sizes: list[int], rounds: int) -> list[dict]:
    """Every encoder loaded side by side, measured in alternating rounds so that a change in the machine's load
    falls on all of them; each figure is the median over rounds."""
    encoders, results = zip(*(loaded(name) for name in names))
    by_round = [[measure_round(encoder, texts, call_size, batch_sizes) for encoder in encoders] for _ in range(rounds)]
    for index, result in enumerate(results):
        runs = [round_results[index] for round_results in by_round]
        for key in ("batch1_mean_ms", "batch1_p50_ms", "batch1_p95_ms"):
            result[key] = float(np.median([run[key] for run in runs]))
        result["rates"] = {size: float(np.median([run["rates"][size] for run in runs])) for size in batch_sizes}
    return list(results)


def markdown(result: dict) -> str:
    """One table per thread count, ratios against the first encoder at the same thread count."""
    batch_sizes = result["batch_sizes"]
    lines = [f"{result['prompts']} test prompts of {result['dataset']}, calls of {result['call_size']}; median of "
             f"{result['rounds']} alternating rounds; ratios against {result['embedders'][0]} at the same threads, same run"]
    for threads, results in result["by_threads"].items():
        base = results[0]
        lines += ["", f"{threads} thread(s):", "",
                  "| encoder | dimension | max tokens | weights MB | resident MB after load | batch 1 ms/prompt mean (p50, p95) "
                  "| vs baseline | " + " | ".join(f"prompts/s at mini-batch {size}" for size in batch_sizes) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(batch_sizes)]
        for r in results:
            rates = " | ".join(f"{r['rates'][size]:.1f} ({r['rates'][size] / base['rates'][size]:.2f}x)" for size in batch_sizes)
            lines.append(f"| {r['name']} | {r['dimension']} | {r['max_tokens']} | {r['weights_mb']:.0f} | {r['rss_mb']:.0f} "
                         f"| {r['batch1_mean_ms']:.1f} ({r['batch1_p50_ms']:.1f}, {r['batch1_p95_ms']:.1f}) "
                         f"| {r['batch1_mean_ms'] / base['batch1_mean_ms']:.2f}x | {rates} |")
        lines += ["", "prompts/s by mini-batch, each encoder against its own one-at-a-time rate:"]
        for r in results:
            one = 1000 / r["batch1_mean_ms"]
            lines.append(f"- {r['name']}: one at a time {one:.1f}/s; "
                         + ", ".join(f"{size}: {r['rates'][size] / one:.2f}x" for size in batch_sizes))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedders", nargs="+", default=[DEFAULT_EMBEDDER], help="the first is the baseline of the ratios")
    parser.add_argument("--dataset", default="llmrouter_9model")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--call-size", type=int, default=32, help="prompts per encode call")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts, each measured in turn")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the encoders; figures are medians")
    parser.add_argument("--out", type=Path, help="also write report.json and report.md into this folder")
    args = parser.parse_args()

    table = load_dataset(args.dataset)
    texts = [table.prompts[row] for row in np.flatnonzero(table.splits == "test")[: args.prompts]]
    by_threads = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        by_threads[threads] = measure(args.embedders, texts, args.call_size, args.batch_sizes, args.rounds)
        gc.collect()  # the encoders of this thread count go before the next are loaded
    result = {"dataset": args.dataset, "prompts": len(texts), "call_size": args.call_size, "batch_sizes": args.batch_sizes,
              "rounds": args.rounds, "embedders": args.embedders, "by_threads": by_threads}
    print(markdown(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(result, indent=1))
        (args.out / "report.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
