"""Encoder throughput by forward mini-batch size, the figure behind `serve.core.encoder.forward_batch_size`.

sentence-transformers sorts one call's prompts by length and pads each mini-batch to its longest, so the
mini-batch size trades padding waste against per-call overhead. Encodes the same test-split prompts in calls
of `--call-size` (the Serve Embedder's batch, or a Ray Data batch) with each mini-batch size, in this process,
and reports prompts/s as a ratio against one prompt at a time, measured in the same run.

    python benchmarks/bench_encode.py --call-size 32 --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from serve.core.encoder import DEFAULT_EMBEDDER, encode, load_encoder
from training.datasets import load_dataset


def prompts_per_second(encoder, texts: list[str], call_size: int, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), call_size):
        encode(encoder, texts[start:start + call_size], batch_size)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="llmrouter_9model")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--call-size", type=int, default=32, help="prompts per encode call")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    table = load_dataset(args.dataset)
    texts = [table.prompts[row] for row in np.flatnonzero(table.splits == "test")[: args.prompts]]
    encoder = load_encoder(DEFAULT_EMBEDDER, device="cpu")
    encode(encoder, texts[:8], 8)  # warm-up
    baseline = prompts_per_second(encoder, texts, 1, 1)
    print(f"{len(texts)} test prompts of {args.dataset}, calls of {args.call_size}, {args.threads} torch thread(s)\n")
    print("| forward mini-batch | prompts/s | vs one prompt at a time |\n|---|---|---|")
    print(f"| 1 (calls of 1) | {baseline:.1f} | 1.00x |")
    for batch_size in args.batch_sizes:
        rate = prompts_per_second(encoder, texts, args.call_size, min(batch_size, args.call_size))
        print(f"| {batch_size} | {rate:.1f} | {rate / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
