"""Forward passes cut by length against sentence-transformers' own passes, on calls of prompts that arrived together.

The Serve Embedder's batches hold whatever prompts arrived within its wait, short and long. sentence-transformers
sorts a call by length and pads each pass of `batch_size` prompts to its longest; `serve.core.encoder.encode` on a
CPU also cuts a pass where padding would add more than PADDING_SLACK of its real tokens (`forward_batches`). Both
are timed on the same calls of random train-split prompts (llmrouter_9model), alternating call by call, in one
process on `--threads` threads, with the largest difference between their embeddings.

    python benchmarks/bench_padding.py [--threads 1] [--out docs/results/encoder_padding]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from serve.core.encoder import (
    DEFAULT_EMBEDDER,
    PADDING_SLACK,
    encode,
    forward_batch_size,
    load_encoder,
)
from serve.core.features import WINDOW_CHARS

CALL_SIZES = (1, 4, 8, 16, 32, 200)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the Embedder replica runs on one)")
    parser.add_argument("--prompts", type=int, default=400, help="train-split prompts to draw the calls from")
    parser.add_argument("--seconds", type=float, default=6, help="per call size")
    parser.add_argument("--out", type=Path, help="folder for report.json and report.md")
    args = parser.parse_args()

    from training.datasets import load_dataset

    torch.set_num_threads(args.threads)
    table = load_dataset("llmrouter_9model")
    rng = np.random.default_rng(0)
    rows = rng.choice(np.flatnonzero(table.splits == "train"), args.prompts, replace=False)
    texts = [table.prompts[row][:WINDOW_CHARS] for row in rows]
    encoder = load_encoder(DEFAULT_EMBEDDER, device="cpu")
    size = forward_batch_size(encoder)
    methods = {"sentence-transformers' passes": lambda call: encoder.encode(call, batch_size=size, convert_to_numpy=True,
                                                                           normalize_embeddings=True),
               "cut by length": lambda call: encode(encoder, call)}
    difference = float(np.abs(methods["cut by length"](texts) - methods["sentence-transformers' passes"](texts)).max())
    results = []
    for call_size in CALL_SIZES:
        calls = [[texts[row] for row in rng.choice(len(texts), min(call_size, len(texts)), replace=False)] for _ in range(max(8, 2 * args.prompts // call_size))]
        seconds, prompts = dict.fromkeys(methods, 0.0), 0
        for method in methods.values():
            method(calls[0])  # warm-up
        for call in calls:
            for name, method in methods.items():
                started = time.perf_counter()
                method(call)
                seconds[name] += time.perf_counter() - started
            prompts += len(call)
            if sum(seconds.values()) > 2 * args.seconds:
                break
        rates = {name: prompts / spent for name, spent in seconds.items()}
        results.append({"call_size": call_size, "prompts_per_s": rates,
                        "ratio": rates["cut by length"] / rates["sentence-transformers' passes"]})
        print(f"calls of {call_size}: " + ", ".join(f"{name} {rate:.1f} prompts/s" for name, rate in rates.items())
              + f", ratio {results[-1]['ratio']:.2f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    baseline = next(iter(methods))
    title = (f"`python benchmarks/bench_padding.py {' '.join(sys.argv[1:])}`, commit {commit}: {DEFAULT_EMBEDDER}, "
             f"{args.threads} thread(s), passes of at most {size} prompts, slack {PADDING_SLACK}; calls of random "
             f"train-split prompts of llmrouter_9model; largest embedding difference {difference:.1e}")
    lines = [title, "", "| prompts per call | sentence-transformers' passes, prompts/s | cut by length, prompts/s | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {row['call_size']} | {row['prompts_per_s'][baseline]:.1f} | {row['prompts_per_s']['cut by length']:.1f} "
              f"| {row['ratio']:.2f} |" for row in results]
    print("\n" + "\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text("\n".join(lines) + "\n")
        (args.out / "report.json").write_text(json.dumps({"argv": sys.argv[1:], "commit": commit, "threads": args.threads,
                                                          "max_difference": difference, "rows": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
